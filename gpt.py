"""GPT-2 in one file: the model, safetensors I/O, Hugging Face checkpoints in and out, batched generation."""
import ctypes, http.client, json, math, os, re, sys, urllib.error, urllib.request, warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
warnings.filterwarnings("ignore", "Failed to initialize NumPy")  # torch warns when numpy is absent; we never use it
import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class GPTConfig:
    vocab_size: int = 50257         # BPE tokens; the last one (50256) is <|endoftext|>
    n_positions: int = 1024         # longest context the position table covers
    n_embd: int = 768               # width of the residual stream
    n_layer: int = 12               # transformer blocks
    n_head: int = 12                # attention heads per block (n_embd % n_head == 0)
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):  # a hand-written config.json may hold anything
        for f in fields(self):
            value = getattr(self, f.name)
            kinds = (int,) if f.type is int else (int, float)
            if type(value) not in kinds or not 0 < value < math.inf:
                raise ValueError(f"config {f.name} must be a positive {f.type.__name__}, not {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"config n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")

# ---------------------------------------------------------------- the model
class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)  # q, k, v fused, as in the checkpoint
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
    def forward(self, x, mask=None, kv=None, start=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        if kv is not None:  # kv: (2, B, nh, S, hs) cache; write this step at [start, start+T), attend to all before
            kv[0, :, :, start:start + T], kv[1, :, :, start:start + T] = k, v
            k, v = kv[0, :, :, :start + T], kv[1, :, :, :start + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon), Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(c.n_embd, 4 * c.n_embd), gelu=nn.GELU(approximate="tanh"),
                                             c_proj=nn.Linear(4 * c.n_embd, c.n_embd)))
    def forward(self, x, mask=None, kv=None, start=0):
        x = x + self.attn(self.ln_1(x), mask, kv, start)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), biases 0, LayerNorm 1 (free on "meta")
            nn.init.normal_(p, std=0.02) if p.ndim == 2 else nn.init.constant_(p, float("ln" in name and "weight" in name))
    def forward(self, idx, pos=None, mask=None, cache=None, start=0, last_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab); pos/mask/cache/start are generate()'s."""
        pos = torch.arange(idx.shape[1], device=idx.device) if pos is None else pos
        # a sparse lookup gradient: the tied head gives wte a dense one already, and the looked-up rows add into it in place
        sparse = idx.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()  # compile wants dense
        x = F.embedding(idx, self.wte.weight, sparse=sparse) + self.wpe(pos)
        for i, block in enumerate(self.h):
            x = block(x, mask, None if cache is None else cache[i], start)
        x = self.ln_f(x[:, -1:] if last_only else x)
        return F.linear(x, self.wte.weight)  # output head tied to the token embedding

class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: y = base(x) + (alpha / r) * x A^T B^T, with B starting at 0."""
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
    def forward(self, x):  # through the rank-r bottleneck: the frozen weight gets no gradient work
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale
    def merged(self) -> nn.Linear:
        self.base.weight.data += self.scale * self.B.data @ self.A.data
        return self.base

def _swap_linears(model: GPT, swap):
    for module in list(model.h.modules()):
        for name, child in list(module.named_children()):
            setattr(module, name, swap(child))

def add_lora(model: GPT, rank: int, alpha: float) -> GPT:
    """Freeze every weight and wrap each Linear of the blocks in a LoRALinear."""
    model.requires_grad_(False)
    _swap_linears(model, lambda m: LoRALinear(m, rank, alpha) if isinstance(m, nn.Linear) else m)
    return model

def merge_lora(model: GPT) -> GPT:
    """Fold each adapter into its base weight (W += scale * B A) and unwrap it: a plain GPT-2 again."""
    _swap_linears(model, lambda m: m.merged() if isinstance(m, LoRALinear) else m)
    return model.requires_grad_(True)

# ---------------------------------------------------------------- safetensors
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
HEADER_LIMIT = 100_000_000  # bytes: the format's cap on the JSON header


def _is_count(x) -> bool:
    """A JSON integer that fits torch's int64 sizes (True and 4.0 are not integers here)."""
    return type(x) is int and 0 <= x < 2**63


def _not_json(word):
    raise ValueError(f"{word} is not a JSON value")


def _tensor_entries(header) -> list:
    """The header's tensors as [(begin, end, name, dtype, shape)], each field checked; sorted by offset."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent, or null as the reference library allows
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ is not an object of strings")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"tensor {name} is not an object with dtype, shape and data_offsets")
        dtype = info["dtype"]
        shape = info["shape"]
        offsets = info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"tensor {name} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(map(_is_count, shape)):
            raise ValueError(f"tensor {name}: shape {shape!r} is not a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
            raise ValueError(f"tensor {name}: data_offsets {offsets!r} is not two integers >= 0")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    return sorted(entries)


def _check_layout(entries, data_size: int):
    """Tensors tile the data exactly: contiguous from 0, no holes or overlaps, each the size its shape needs."""
    end = 0
    for begin, stop, name, dtype, shape in entries:
        if begin < end:
            raise ValueError(f"tensor {name} starts at {begin}, overlapping the previous data (ends at {end})")
        if begin > end:
            raise ValueError(f"tensor {name} starts at {begin}, leaving a hole after the previous data (ends at {end})")
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if stop - begin != need:
            raise ValueError(f"tensor {name} spans {stop - begin} bytes, but {dtype} x {shape} needs {need}")
        end = stop
    if end != data_size:
        raise ValueError(f"the tensors cover {end} bytes of data, but the file has {data_size}")


def read_safetensors(path) -> dict:
    """Memory-map a .safetensors file into {name: tensor}, checking every rule of the format."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # the header's length in bytes
        try:
            if size < 8:
                raise ValueError(f"truncated: {size} bytes, shorter than the 8-byte header length")
            if n > HEADER_LIMIT:
                raise ValueError(f"a header of {n} bytes is over the 100 MB limit")
            if 8 + n > size:
                raise ValueError(f"a header of {n} bytes runs past the end of the {size}-byte file")
            text = f.read(n).decode("utf-8")
            try:
                header = json.loads(text, parse_constant=_not_json)  # NaN and Infinity are not JSON
            except json.JSONDecodeError as e:
                raise ValueError(f"the header is not JSON ({e})") from None
            entries = _tensor_entries(header)
            _check_layout(entries, size - 8 - n)
        except RecursionError:
            raise ValueError(f"{path}: not a valid safetensors file: the header is nested too deeply") from None
        except ValueError as e:  # json's and UTF-8's errors are ValueErrors too
            raise ValueError(f"{path}: not a valid safetensors file: {e}") from None
    # a private copy-on-write map of the file: pages load as tensors touch them, and writes never reach the file
    raw = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(path), False, size))
    tensors = {}
    for begin, stop, name, dtype, shape in entries:
        t = raw[8 + n + begin:8 + n + stop]
        if t.storage_offset() % DTYPES[dtype].itemsize:
            t = t.clone()  # a view must start on a multiple of its item size; copy the rare misaligned one
        tensors[name] = t.view(DTYPES[dtype]).view(shape)
    return tensors


def _atomic_write(path, write, check=None):
    """write(f) into a temp file, fsync, check(temp), then rename over path: no reader sees a half or bad file."""
    root, extension = os.path.splitext(path)
    tmp = f"{root}.tmp{extension}"  # one fixed name, so a killed write is overwritten by the next, never piles up
    try:
        with open(tmp, "wb") as f:  # a new file's mode follows the umask
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk or a read-only folder: name the file
            raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_text(path, text: str):
    _atomic_write(path, lambda f: f.write(text.encode()))


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """{name: tensor} -> a .safetensors file, tensors in order, each 8-byte aligned."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    names = {t: name for name, t in DTYPES.items()}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        blob = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + blob.numel()]}
        blobs.append(blob)
        offset += blob.numel()
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data, and so every tensor, starts 8-byte aligned

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for blob in blobs:  # torch offers no buffer protocol without numpy: hand write() the raw memory
            if blob.numel():
                f.write((ctypes.c_char * blob.numel()).from_address(blob.data_ptr()))
    _atomic_write(path, write)


# ---------------------------------------------------------------- Hugging Face checkpoints
ALIASES = {a: f"openai-community/{a}" for a in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name; never "." or ".."
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
DOWNLOAD_TIMEOUT = 60  # seconds a download may wait for the server's next bytes
HTTP_ERRORS = (OSError, http.client.HTTPException, ValueError)  # refused, reset, timed out, not HTTP, bad URL


def _copy_body(response, f, url: str):
    """Copy a response body into f, refusing one that ends before its Content-Length."""
    total = response.headers.get("Content-Length")
    while True:
        try:
            chunk = response.read(1 << 22)
        except HTTP_ERRORS as e:  # a reset, a stall, a chunked body cut short
            raise ValueError(f"the download of {url} broke off ({type(e).__name__}: {e}); try again") from None
        if not chunk:
            break
        f.write(chunk)
        print(f"\rdownloading {url}: {f.tell() / 1e6:.0f} MB", end="", file=sys.stderr)
    print(file=sys.stderr)
    if total is not None and f.tell() != int(total):  # http.client ends a short sized body quietly
        raise ValueError(f"the download of {url} stopped at {f.tell()} of {total} bytes; try again")


def download(url: str, dest: str, check):
    """Fetch url into dest, whole (Content-Length) and valid (check(path) raises ValueError), or not at all."""
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)  # follows the hub's redirect
    except urllib.error.HTTPError as e:
        reason = "not found" if e.code in (401, 404) else f"HTTP {e.code} {e.reason}"
        raise ValueError(f"{url}: {reason}") from None
    except HTTP_ERRORS as e:
        reason = " ".join(str(getattr(e, "reason", e)).split())  # one line, even from a server that sent junk
        raise ValueError(f"cannot download {url} ({reason}): check the network connection") from None

    def check_download(tmp):
        try:
            check(tmp)
        except ValueError as e:  # a proxy's HTML page, say
            raise ValueError(f"{url} sent something else than the file ({e})") from None
    with response:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _atomic_write(dest, lambda f: _copy_body(response, f, url), check_download)


def cache_dir(*parts) -> str:
    """$XDG_CACHE_HOME/gpt2-sft/... (default ~/.cache/gpt2-sft/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "gpt2-sft", *parts)


def read_config(path) -> GPTConfig:
    """A checkpoint's config.json -> GPTConfig (extra keys ignored, the sizes checked)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a JSON object")
    try:
        return GPTConfig(**{f.name: raw[f.name] for f in fields(GPTConfig) if f.name in raw})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _fetch(repo: str) -> str:
    """Download a hub repo's config.json and model.safetensors once into the cache; returns the folder."""
    folder = cache_dir(repo)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    checks = {"config.json": read_config, "model.safetensors": read_safetensors}
    for file, check in checks.items():
        if not os.path.exists(os.path.join(folder, file)):  # a file appears only when whole and checked
            download(f"{endpoint}/{repo}/resolve/main/{file}", os.path.join(folder, file), check)
    return folder


def _load_folder(folder: str) -> GPT:
    config = read_config(os.path.join(folder, "config.json"))
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no model.safetensors; a checkpoint folder holds config.json and model.safetensors")
    state = {}
    for k, v in read_safetensors(path).items():
        k = k.removeprefix("transformer.")  # transformers' save_pretrained writes this prefix
        buffer = k.endswith((".attn.bias", ".attn.masked_bias")) and not k.endswith("c_attn.bias")
        if buffer or k == "lm_head.weight":
            continue  # causal-mask buffers and the tied head carry nothing we need
        if k.endswith(CONV1D):
            v = v.t()
        state[k] = v
    with torch.device("meta"):
        model = GPT(config)  # no memory yet: the file's tensors are assigned below
    wanted = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    for k in sorted(wanted.keys() | state.keys()):
        if k not in state:
            raise ValueError(f"{path}: tensor {k}: missing")
        if k not in wanted:
            raise ValueError(f"{path}: tensor {k}: unexpected")
        if tuple(state[k].shape) != wanted[k]:
            raise ValueError(f"{path}: tensor {k}: shape {tuple(state[k].shape)}, config says {wanted[k]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)  # F32 stays memory-mapped
    return model


def from_pretrained(name: str) -> GPT:
    """A GPT-2 checkpoint in the Hugging Face layout: a local folder, an alias, or an owner/name repo (cached)."""
    if os.path.isdir(name):
        return _load_folder(name)
    repo = ALIASES.get(name, name)
    if not REPO.fullmatch(repo):
        raise ValueError(f"model {name}: no such folder, and not a Hugging Face repo name like gpt2-medium or owner/name")
    try:
        folder = _fetch(repo)
    except ValueError as e:
        raise ValueError(f"{e}; --model takes a GPT-2 repo (gpt2-medium, owner/name) or a local folder, "
                         "and HF_ENDPOINT sets a mirror") from None
    try:
        return _load_folder(folder)
    except ValueError as e:  # a cached file spoiled after its download was checked
        raise ValueError(f"{e} (a cached download: delete {folder} to download it again)") from None


def save_pretrained(model: GPT, out_dir: str):
    """Write config.json + model.safetensors in the hub layout (no prefix, Conv1D weights (in, out), no lm_head)."""
    os.makedirs(out_dir, exist_ok=True)
    config = {
        **asdict(model.config), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "activation_function": "gelu_new", "tie_word_embeddings": True,
    }
    tensors = {}
    for k, v in model.state_dict().items():
        tensors[k] = v.t() if k.endswith(CONV1D) else v
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "pt"})
    write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))


# ---------------------------------------------------------------- generation
@torch.no_grad()
def generate(model: GPT, prompts, max_new_tokens: int, eos_id=None, temperature=0.0, top_k=None) -> list:
    """Continue each prompt (a list of token ids; lengths may differ) in one KV-cached batch; new ids only, no eos."""
    c, dev = model.config, model.wte.weight.device
    prompts = [p[-(c.n_positions - 1):] for p in prompts]  # keep the newest tokens of an over-long prompt
    B, P = len(prompts), max(map(len, prompts))
    S = min(P + max_new_tokens, c.n_positions)  # generation stops when the context is full
    x = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=dev)  # left-padded so all rows end together
    valid = torch.arange(S, device=dev) >= torch.tensor([P - len(p) for p in prompts], device=dev)[:, None]  # (B, S)
    pos = (valid.cumsum(1) - 1).clamp(min=0)                    # (B, S): each row's positions start at 0
    cache = [torch.empty(2, B, c.n_head, S, c.n_embd // c.n_head, device=dev, dtype=model.wte.weight.dtype) for _ in model.h]
    out, done, start, idx = [], torch.zeros(B, dtype=torch.bool, device=dev), 0, torch.arange(S, device=dev)
    for _ in range(S - P):
        T = x.shape[1]
        q, k = idx[start:start + T, None], idx[None, :start + T]
        mask = (k <= q) & valid[:, None, :start + T] | (k == q)  # (B, T, S) causal, no padding; pads see themselves
        logits = model(x, pos[:, start:start + T], mask[:, None], cache, start, last_only=True)[:, -1]
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:  # sample from the top_k most likely (all when top_k is None)
            logits = logits.float() / temperature
            logits[logits < logits.topk(min(top_k or c.vocab_size, c.vocab_size)).values[:, -1:]] = -math.inf
            nxt = torch.multinomial(logits.softmax(-1), 1)[:, 0]
        out.append(nxt)
        done |= nxt == eos_id
        if done.all():
            break
        x, start = nxt[:, None], start + T
    return [r[:r.index(eos_id)] if eos_id in r else r for r in (torch.stack(out, 1).tolist() if out else [[]] * B)]
