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


class Bodies(list):
    """The chat bodies a stand-in Ollama received, with the paths they were posted to."""
    def __init__(self):
        super().__init__()
        self.paths = []
        self.headers = []


class JSONHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in server's replies: send(code, a JSON-able object or raw bytes); no request log."""
    def send(self, code, obj):
        import json
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a):
        pass


def ollama(replies=("85",), models=("llama3:latest",), status=200, error=None, stall=False, tags=None,
           fail_from=None, body=None):
    """A stand-in Ollama on 127.0.0.1 (under any path prefix), in Ollama's shapes: its own API (GET /api/tags,
    POST /api/chat with "stream": false: one JSON object) and its OpenAI-compatible one under /v1 (GET /v1/models
    lists data[].id, POST /v1/chat/completions answers choices[0].message.content, errors are
    {"error": {"message", "type", ...}}). Records each chat body (and its path in .paths).

    tags: a raw model-list body; fail_from: HTTP 500 from that chat request on (1-based); stall: no reply for 3 s;
    body: raw bytes sent as the chat reply (a cut or malformed one)."""
    import json
    import time
    bodies = Bodies()

    class Ollama(JSONHandler):
        def do_GET(self):
            if tags is not None:
                return self.send(200, tags)
            if self.path.endswith("/v1/models"):
                return self.send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
            self.send(200, {"models": [{"name": m} for m in models]})

        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            bodies.paths.append(self.path)
            bodies.headers.append(dict(self.headers))
            openai = self.path.endswith("/v1/chat/completions")
            failing = fail_from is not None and len(bodies) >= fail_from
            if status != 200 or failing:
                message = error or "boom"
                return self.send(500 if failing else status,
                                 {"error": {"message": message, "type": "api_error"}} if openai else {"error": message})
            if stall:
                time.sleep(3)
            if body is not None:
                self.send_response(200)
                self.end_headers()
                return self.wfile.write(body)
            reply = replies[(len(bodies) - 1) % len(replies)]
            message = {"role": "assistant", "content": reply}
            if openai:
                return self.send(200, {"object": "chat.completion", "choices": [{"index": 0, "message": message}]})
            self.send(200, {"message": message, "done": True})

    url, srv = serve(Ollama)
    return url, bodies


def openai_server(replies=("85",), models=("gpt-4o-mini",), status=200, error="boom", key=None, body=None):
    """A stand-in OpenAI-compatible server on 127.0.0.1, in OpenAI's shapes: GET /v1/models lists data[].id, POST
    /v1/chat/completions answers choices[0].message.content, errors are {"error": {"message", "type", "code"}}.
    key: the only Authorization it takes (401 otherwise). Records each chat body, and every request's headers."""
    import json
    bodies = Bodies()

    class OpenAI(JSONHandler):
        def fail(self, code, message, kind, error_code):
            self.send(code, {"error": {"message": message, "type": kind, "param": None, "code": error_code}})

        def refused(self):
            bodies.headers.append(dict(self.headers))
            if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
                sent = self.headers.get("Authorization", "").removeprefix("Bearer ")
                self.fail(401, f"Incorrect API key provided: {sent}.", "invalid_request_error", "invalid_api_key")
                return True
            return False

        def do_GET(self):
            if not self.refused():
                self.send(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "me"} for m in models]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.refused():
                return
            bodies.append(request)
            bodies.paths.append(self.path)
            if status != 200:
                return self.fail(status, error, "rate_limit_exceeded" if status == 429 else "server_error", None)
            if body is not None:
                return self.send(200, body)
            reply = replies[(len(bodies) - 1) % len(replies)]
            choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
            self.send(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": request["model"], "choices": [choice]})

    url, srv = serve(OpenAI)
    return url + "/v1", bodies


from hypothesis import settings  # noqa: E402

settings.register_profile("no-deadline", deadline=None)  # a loaded CI machine must not turn slowness into failures
settings.load_profile("no-deadline")
