"""gpt.py: weights load exactly as transformers computes them, saving round-trips, generation is batch-safe."""
import http.server, json, os, struct, threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import gpt
from conftest import FIXTURE, serve, tiny_model

REF = json.loads((FIXTURE / "reference.json").read_text())


def test_fixture_checkpoint_reproduces_transformers_logits_and_greedy_ids():
    model = gpt.from_pretrained(str(FIXTURE)).eval()
    with torch.no_grad():
        logits = model(torch.tensor(REF["input_ids"]))
    assert (logits - torch.tensor(REF["logits"])).abs().max() < 1e-4
    prompt = REF["greedy_prompt"][0]
    assert prompt + gpt.generate_batch(model, [prompt], 10)[0] == REF["greedy_ids"][0]


@pytest.mark.parametrize("prefix,dtype", [("", torch.float32), ("transformer.", torch.float16), ("", torch.bfloat16)])
def test_loader_accepts_prefixed_keys_and_half_precision_files(tmp_path, prefix, dtype):
    tensors = gpt.read_safetensors(FIXTURE / "model.safetensors")
    gpt.write_safetensors(tmp_path / "model.safetensors", {prefix + k: v.to(dtype) for k, v in tensors.items()})
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    ids = torch.tensor(REF["input_ids"])
    with torch.no_grad():
        got = gpt.from_pretrained(str(tmp_path))(ids)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert (got - torch.tensor(REF["logits"])).abs().max() < tol


def test_save_pretrained_round_trips_logits_in_the_hub_layout(tmp_path):
    model = tiny_model()
    gpt.save_pretrained(model, tmp_path)
    header = gpt.read_safetensors(tmp_path / "model.safetensors")
    assert not any(k.startswith(("transformer.", "lm_head")) for k in header)
    assert header["h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D layout: (in, out)
    assert header["h.1.attn.c_attn.weight"].shape == (32, 96)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), gpt.from_pretrained(str(tmp_path))(ids))


def test_the_saved_config_json_holds_the_keys_transformers_and_llama_cpp_read(tmp_path):
    gpt.save_pretrained(tiny_model(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],  # which class transformers builds
        "activation_function": "gelu_new",  # GPT-2's tanh GELU: any other value computes other logits
        "vocab_size": 512, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        "n_ctx": 64,  # llama.cpp's converter reads the context here
        "bos_token_id": 50256, "eos_token_id": 50256}  # where generation stops, in transformers and a GGUF


def test_a_saved_folder_carries_gpt2s_tokenizer_files_and_stays_whole_when_loaded_and_saved_again(tmp_path):
    gpt.save_pretrained(tiny_model(), tmp_path / "a")
    gpt.save_pretrained(gpt.from_pretrained(str(tmp_path / "a")), tmp_path / "b")
    files = ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b")) == files
    shipped = Path(gpt.TIKTOKEN_CACHE)
    for folder in ("a", "b"):  # tiktoken's encoder.json is the hub's vocab.json, its vocab.bpe merges.txt
        assert (tmp_path / folder / "vocab.json").read_bytes() == (shipped / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").read_bytes()
        assert (tmp_path / folder / "merges.txt").read_bytes() == (shipped / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_loader_names_the_tensor_whose_shape_disagrees_with_the_config(tmp_path):
    tensors = gpt.read_safetensors(FIXTURE / "model.safetensors")
    tensors["h.1.mlp.c_fc.bias"] = torch.zeros(7)
    gpt.write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(ValueError, match=r"(?s)not a GPT-2 checkpoint .*mismatch for h\.1\.mlp\.c_fc\.bias.*\[7\].*\[128\]"):
        gpt.from_pretrained(str(tmp_path))
    del tensors["h.1.mlp.c_fc.bias"]
    tensors["h.1.extra"] = torch.zeros(1)
    gpt.write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r'(?s)Missing key.*"h\.1\.mlp\.c_fc\.bias".*Unexpected key.*"h\.1\.extra"'):
        gpt.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------- generation
def greedy_without_cache(model, prompt, n, eos_id=None):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt == eos_id:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_ragged_batch_equals_each_prompt_alone_equals_the_plain_loop():
    model = tiny_model(seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 7, 3, 12)]
    batched = gpt.generate_batch(model, prompts, 15)
    alone = [gpt.generate_batch(model, [p], 15)[0] for p in prompts]
    plain = [greedy_without_cache(model, p, 15) for p in prompts]
    assert batched == alone == plain
    assert all(len(r) == 15 for r in batched)


def test_eos_stops_a_row_and_is_not_returned():
    model = tiny_model(seed=2)
    prompts = [[5, 6, 7], [9], [100, 200, 300, 400]]
    free = gpt.generate_batch(model, prompts, 12)
    i = next(i for i in range(1, 12) if free[0][i] not in free[0][:i])
    eos = free[0][i]  # a token row 0 meets first at step i becomes the end-of-text
    got = gpt.generate_batch(model, prompts, 12, eos_id=eos)
    assert got[0] == free[0][:i]
    assert got == [greedy_without_cache(model, p, 12, eos_id=eos) for p in prompts]
    assert all(eos not in r for r in got)


def test_with_eos_a_ragged_batch_answers_as_the_books_generate_does_for_each_prompt_alone():
    model = tiny_model(seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (2, 9, 5, 14)]
    free = gpt.generate_batch(model, prompts, 12)
    eos = free[1][3]  # met by row 1 at its 4th token: one row stops early, the others later or never
    book = [gpt.generate(model, torch.tensor([p]), 12, model.config.n_positions, eos_id=eos)[0, len(p):].tolist()
            for p in prompts]
    assert gpt.generate_batch(model, prompts, 12, eos_id=eos) == book
    assert len(book[1]) <= 3 and len({len(b) for b in book}) > 1  # rows of different lengths: the stops differ


# ---------------------------------------------------------------- safetensors
def raw_file(tmp_path, header, data=b"", n=None):
    head = json.dumps(header).encode() if isinstance(header, dict) else header
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(head) if n is None else n) + head + data)
    return path


F4 = {"dtype": "F32", "shape": [1]}
BAD_FILES = {  # the rules a student needs; anything else malformed surfaces through the same one line
    "shorter than the length": (b"", b"", None, "does not fit"),
    "header length past the end": ({"a": {**F4, "data_offsets": [0, 4]}}, b"\0" * 4, 500, "does not fit"),
    "not JSON": (b"{nope", b"", None, "JSONDecodeError"),
    "header a list": (b"[1, 2]", b"", None, "TypeError"),
    "header not UTF-8": (b'{"\xff": 1}', b"", None, "UnicodeDecodeError"),
    "deep nesting": (b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", b"", None, "RecursionError"),
    "unknown dtype": ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "KeyError: 'Q7'"),
    "no shape": ({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4, None, "KeyError: 'shape'"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
                      "tensor a: bytes 0 to 8 cannot hold torch.float32 \\[3\\]"),
    "data cut short": ({"a": {**F4, "data_offsets": [0, 4]}}, b"\0" * 2, None, "bytes 0 to 4 cannot hold"),
    "offsets reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4, None, "cannot hold"),
    "three offsets": ({"a": {**F4, "data_offsets": [0, 4, 8]}}, b"\0" * 4, None, "too many values"),
    "string offsets": ({"a": {**F4, "data_offsets": ["0", "4"]}}, b"\0" * 4, None, "TypeError"),
    "negative dims": ({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "RuntimeError"),
}


def test_the_reader_accepts_metadata_padding_and_keys_it_does_not_know(tmp_path):
    head = b' {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "note": {}}}  '
    assert gpt.read_safetensors(raw_file(tmp_path, head, b"\0" * 4))["a"].shape == (1,)


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_malformed_file_is_one_error_naming_the_file(tmp_path, case):
    header, data, n, message = BAD_FILES[case]
    path = raw_file(tmp_path, header, data, n) if case != "shorter than the length" else tmp_path / "t"
    if case == "shorter than the length":
        path.write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match=message) as err:
        gpt.read_safetensors(path)
    assert str(err.value).startswith(f"{path}: not a valid safetensors file (")


DT = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64])
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text("abc.", min_size=1, max_size=6), st.tuples(DT, SHAPES, st.integers(0, 2**31)), max_size=5))
def test_safetensors_round_trip_is_exact(tmp_path_factory, spec):
    tensors = {}
    for name, (dtype, shape, seed) in spec.items():
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(-2**40, 2**40, shape, generator=g) if dtype == torch.int64 else torch.randn(shape, generator=g)
        tensors[name] = t.to(dtype)
    path = tmp_path_factory.mktemp("st") / "r.safetensors"
    gpt.write_safetensors(path, tensors, {"format": "pt"})
    back = gpt.read_safetensors(path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)


# ---------------------------------------------------------------- the hub
def hub(tmp_path, repo):
    """A loopback server in the hub's URL layout: resolve/main/FILE redirects to the file, as the hub does."""
    files = {f"/{repo}/resolve/main/{f}": (FIXTURE / f).read_bytes() for f in ("config.json", "model.safetensors")}
    hits = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path in files:
                self.send_response(302)
                self.send_header("Location", "/blobs" + self.path)
                self.end_headers()
            elif self.path.removeprefix("/blobs") in files:
                body = files[self.path.removeprefix("/blobs")]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *a):
            pass
    url, srv = serve(Hub)
    return url, srv, hits


def test_hub_download_is_cached_and_a_missing_repo_is_named(tmp_path, monkeypatch):
    url, srv, hits = hub(tmp_path, "someone/tiny")
    monkeypatch.setenv("HF_ENDPOINT", url)
    first = gpt.from_pretrained("someone/tiny")
    assert len(hits) == 4  # two redirects, two files
    second = gpt.from_pretrained("someone/tiny")
    assert len(hits) == 4  # served from the cache
    assert torch.equal(first.wte.weight, second.wte.weight)
    cached = os.path.join(os.environ["XDG_CACHE_HOME"], "gpt2-sft", "someone", "tiny")
    assert sorted(os.listdir(cached)) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="cannot download .*nobody/nothing.*Not Found.*GPT-2 repo"):
        gpt.from_pretrained("nobody/nothing")
    srv.shutdown()
    srv.server_close()
    with pytest.raises(ValueError, match="cannot download .*openai-community/gpt2/.*refused.*or a folder"):
        gpt.from_pretrained("gpt2")


def raw_server(responses):
    """A loopback TCP server that answers each request for a path with canned raw bytes, then hangs up."""
    import socketserver

    class Raw(socketserver.StreamRequestHandler):
        def handle(self):
            path = self.rfile.readline().split()[1].decode()
            while self.rfile.readline().strip():  # the rest of the request head
                pass
            self.wfile.write(responses.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Raw)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}"


CONFIG = (FIXTURE / "config.json").read_bytes()
WEIGHTS = (FIXTURE / "model.safetensors").read_bytes()


def ok(body):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


BROKEN_DOWNLOADS = {
    "body cut short": (ok(WEIGHTS)[:-1000], "stopped at .* of %d bytes" % len(WEIGHTS)),
    "chunked body cut short": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + WEIGHTS[:100],
                               "broke off"),
    "an HTML page": (ok(b"<html>Please log in</html>"), "sent something else than the file .*not a valid safetensors"),
    "not an HTTP server": (b"SSH-2.0-OpenSSH_9.2\r\n", "(?s)cannot download .*model.safetensors"),
}


@pytest.mark.parametrize("case", BROKEN_DOWNLOADS)
def test_a_broken_download_is_one_error_and_nothing_is_cached(tmp_path, monkeypatch, case):
    reply, message = BROKEN_DOWNLOADS[case]
    url = raw_server({"/o/m/resolve/main/config.json": ok(CONFIG), "/o/m/resolve/main/model.safetensors": reply})
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(ValueError, match=message):
        gpt.from_pretrained("o/m")
    assert os.listdir(gpt.cache_dir("o", "m")) == ["config.json"]  # checked and kept; no weights, no temp file
    url = raw_server({"/o/m/resolve/main/model.safetensors": ok(WEIGHTS)})  # the network heals
    monkeypatch.setenv("HF_ENDPOINT", url)
    assert gpt.from_pretrained("o/m").config.n_layer == 2


def test_an_html_config_is_refused_before_it_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", raw_server({"/o/m/resolve/main/config.json": ok(b"<!DOCTYPE html>")}))
    with pytest.raises(ValueError, match="config.json sent something else than the file .*not a readable GPT-2 config"):
        gpt.from_pretrained("o/m")
    assert not os.path.exists(gpt.cache_dir("o", "m", "config.json"))


def test_a_stalled_download_and_a_bad_url_are_one_line(monkeypatch):
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts, never answers
    monkeypatch.setattr(gpt, "DOWNLOAD_TIMEOUT", 0.5)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    with pytest.raises(ValueError, match="cannot download .*timed out"):
        gpt.from_pretrained("o/m")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1/a b")
    with pytest.raises(ValueError, match="cannot download"):
        gpt.from_pretrained("o/m")
    listener.close()


def test_a_spoiled_cache_file_is_named(monkeypatch):
    folder = gpt.cache_dir("o", "m")
    os.makedirs(folder)
    (Path(folder) / "config.json").write_bytes(CONFIG)
    (Path(folder) / "model.safetensors").write_bytes(WEIGHTS[:-10])
    with pytest.raises(ValueError, match=f"{folder}/model.safetensors: not a valid safetensors file"):
        gpt.from_pretrained("o/m")


def test_a_leftover_temp_file_is_reused_not_piled_up(monkeypatch):
    folder = gpt.cache_dir("o", "m")
    os.makedirs(folder)
    (Path(folder) / "model.tmp.safetensors").write_bytes(b"from a download killed with SIGKILL")
    url = raw_server({"/o/m/resolve/main/config.json": ok(CONFIG), "/o/m/resolve/main/model.safetensors": ok(WEIGHTS)})
    monkeypatch.setenv("HF_ENDPOINT", url)
    gpt.from_pretrained("o/m")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", ["x/..", "owner/.", "../etc", "a/b/c", "-x/y"])
def test_repo_names_that_are_paths_are_refused(name):
    with pytest.raises(ValueError, match="no such folder, nor a Hugging Face repo"):
        gpt.from_pretrained(name)


@pytest.mark.parametrize("field,value", [("n_embd", "32"), ("n_layer", 2.0), ("n_positions", -1)])
def test_a_hand_edited_config_is_one_error_naming_the_folder(tmp_path, field, value):
    config = json.loads(CONFIG)
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(WEIGHTS)
    with pytest.raises(ValueError, match=f"^{tmp_path}.*(not a readable GPT-2 config|not a GPT-2 checkpoint that loads)"):
        gpt.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("edit, named", [({"tie_word_embeddings": False}, "tie_word_embeddings"),
                                         ({"activation_function": "relu"}, "activation_function relu"),
                                         ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx")])
def test_a_config_this_gpt2_cannot_represent_is_refused_naming_what_differs(tmp_path, edit, named):
    gpt.save_pretrained(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=f"{named}.*cannot"):
        gpt.from_pretrained(str(tmp_path))


def test_an_untied_output_head_is_refused_and_a_tied_copy_loads(tmp_path):
    model = tiny_model()
    tensors = dict(gpt.read_safetensors(gpt.save_pretrained(model, tmp_path) or tmp_path / "model.safetensors"))
    gpt.write_safetensors(tmp_path / "model.safetensors", {**tensors, "lm_head.weight": tensors["wte.weight"].clone()})
    assert torch.equal(gpt.from_pretrained(str(tmp_path)).wte.weight, model.wte.weight)  # tied: the same numbers
    gpt.write_safetensors(tmp_path / "model.safetensors", {**tensors, "lm_head.weight": tensors["wte.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        gpt.from_pretrained(str(tmp_path))
