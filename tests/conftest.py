"""Shared test helpers: offline tokenizer, the fixture checkpoint, a tiny random GPT-2, a loopback HTTP server."""
import http.server, os, threading
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-gpt2"
DATA = Path(__file__).resolve().parents[1] / "data" / "instruction-data.json"

import gpt  # noqa: E402  (after the environment is set)
import torch  # noqa: E402


def tiny_model(seed=0, vocab=512, **kw):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(**{"vocab_size": vocab, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, **kw})).eval()


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Downloads go to a per-test cache, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def serve(handler_cls):
    """Start a ThreadingHTTPServer on 127.0.0.1 in a daemon thread; returns (base_url, server)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}", srv


def ollama(replies=("85",), stream=True, models=("llama3:latest",), status=200, error=None, stall=False):
    """A stand-in Ollama on 127.0.0.1: answers /api/version, /api/tags and /api/chat; records chat bodies."""
    import json
    import time
    bodies = []

    class Ollama(http.server.BaseHTTPRequestHandler):
        def send(self, code, obj):
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps(obj).encode())

        def do_GET(self):
            self.send(200, {"version": "0.9.0"} if self.path == "/api/version" else {"models": [{"name": m} for m in models]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            if status != 200:
                return self.send(status, {"error": error})
            reply = replies[(len(bodies) - 1) % len(replies)]
            if not stream:
                return self.send(200, {"message": {"role": "assistant", "content": reply}, "done": True})
            self.send_response(200)
            self.end_headers()
            half = len(reply) // 2
            for part in (reply[:half], reply[half:]):
                self.wfile.write((json.dumps({"message": {"content": part}, "done": False}) + "\n").encode())
                self.wfile.flush()
            if error:
                self.wfile.write((json.dumps({"error": error}) + "\n").encode())
            if stall:
                time.sleep(3)
            self.wfile.write(b'{"message": {"content": ""}, "done": true}\n')

        def log_message(self, *a):
            pass
    url, srv = serve(Ollama)
    return url, bodies

from hypothesis import settings  # noqa: E402

settings.register_profile("no-deadline", deadline=None)  # a loaded CI machine must not turn slowness into failures
settings.load_profile("no-deadline")
