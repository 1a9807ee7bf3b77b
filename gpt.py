"""GPT-2 in one file: the model, safetensors I/O, Hugging Face checkpoints in and out, batched generation."""
import ctypes, json, math, os, sys, tempfile, urllib.error, urllib.request, warnings
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
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

def read_safetensors(path) -> dict:
    """Memory-map a .safetensors file into {name: tensor}, checking every rule of the format."""
    def bad(rule):
        return ValueError(f"{path}: not a valid safetensors file: {rule}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if rule := (f"truncated: {size} bytes, shorter than the 8-byte header length" if size < 8 else
                    f"header of {n} bytes is over the 100 MB limit" if n > 100_000_000 else
                    f"header length {n} runs past the end of the {size}-byte file" if 8 + n > size else None):
            raise bad(rule)
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            entries = sorted(([*map(int, v["data_offsets"])], k, v["dtype"], [*map(int, v["shape"])]) for k, v in header.items())
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise bad(f"header is not JSON of the form {{name: {{dtype, shape, data_offsets}}}} ({e})") from None
    end = 0
    for (b, e), name, dtype, shape in entries:
        if dtype not in DTYPES:
            raise bad(f"tensor {name} has unknown dtype {dtype!r}")
        if b != end:
            raise bad(f"tensor {name} starts at {b}, {'overlapping' if b < end else 'leaving a hole after'} the previous data (ends at {end})")
        if e - b != (need := math.prod(shape) * DTYPES[dtype].itemsize):
            raise bad(f"tensor {name} spans {e - b} bytes but {dtype} x {shape} needs {need}")
        end = e
    if 8 + n + end != size:
        raise bad(f"data ends at byte {8 + n + end} but the file has {size} bytes")
    raw = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(path), False, size))  # private mmap
    views = {name: (raw[8 + n + b:8 + n + e], DTYPES[dtype], shape) for (b, e), name, dtype, shape in entries}  # copied only if unaligned
    return {k: (t if t.storage_offset() % dt.itemsize == 0 else t.clone()).view(dt).view(s) for k, (t, dt, s) in views.items()}

def write_text(path, text: str):
    _atomic_write(path, lambda f: f.write(text.encode()))

def _atomic_write(path, write):
    """Write through a temp file in the same folder, then rename: a crash never leaves a half file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    header, offset, blobs = {"__metadata__": metadata} if metadata else {}, 0, []
    for name, t in tensors.items():
        b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": {v: k for k, v in DTYPES.items()}[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + b.numel()]}
        blobs.append(b)
        offset += b.numel()
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so every tensor starts 8-byte aligned
    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for b in blobs:  # torch offers no buffer protocol without numpy: hand write() the raw memory
            if b.numel():
                f.write((ctypes.c_char * b.numel()).from_address(b.data_ptr()))
    _atomic_write(path, write)

# ---------------------------------------------------------------- Hugging Face checkpoints
ALIASES = {a: f"openai-community/{a}" for a in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)

def download(url, dest, hint):
    """Fetch url into dest (atomically) with a progress line on stderr; failures become one clear ValueError."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:  # follows the hub's redirect
            total = int(r.headers.get("Content-Length") or 0)

            def write(f):
                while chunk := r.read(1 << 22):
                    f.write(chunk)
                    print(f"\rdownloading {url}: {f.tell() / 1e6:.0f}/{total / 1e6:.0f} MB", end="", file=sys.stderr)
            _atomic_write(dest, write)
            print(file=sys.stderr)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: {'not found' if e.code in (401, 404) else f'HTTP {e.code}'}; {hint}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        raise ValueError(f"cannot reach {url} ({getattr(e, 'reason', e)}); {hint}") from None

def cache_dir(*parts) -> str:
    """$XDG_CACHE_HOME/gpt2-sft/... (default ~/.cache/gpt2-sft/...), created on first use."""
    d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2-sft", *parts)
    os.makedirs(d, exist_ok=True)
    return d

def from_pretrained(name: str) -> GPT:
    """Load a GPT-2 checkpoint in the Hugging Face layout: a local folder, an alias, or an owner/name repo (cached)."""
    d, repo = name, ALIASES.get(name, name)
    if not os.path.isdir(name):
        if repo.count("/") != 1 or os.sep in name and os.path.exists(os.path.dirname(name)):
            raise ValueError(f"model {name}: no such folder, and not a Hugging Face repo name like gpt2-medium or owner/name")
        d, endpoint = cache_dir(repo), os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        for file in ("config.json", "model.safetensors"):  # each file appears only when whole, so a cached one is done
            if not os.path.exists(os.path.join(d, file)):
                download(f"{endpoint}/{repo}/resolve/main/{file}", os.path.join(d, file),
                         f"is model {repo} a GPT-2 repo (e.g. gpt2-medium, owner/name)? Set HF_ENDPOINT for a mirror")
    try:
        with open(os.path.join(d, "config.json")) as f:
            raw = json.load(f)
        config = GPTConfig(**{k.name: raw[k.name] for k in fields(GPTConfig) if k.name in raw})
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{d}: no readable GPT-2 config.json ({e}); a checkpoint folder holds config.json and model.safetensors") from None
    sd = {}
    for k, v in read_safetensors(os.path.join(d, "model.safetensors")).items():
        k = k.removeprefix("transformer.")
        if k.endswith(("attn.bias", "attn.masked_bias")) and not k.endswith("c_attn.bias") or k == "lm_head.weight":
            continue  # causal-mask buffers and the tied head carry nothing we need
        sd[k] = v.t() if k.endswith(CONV1D) else v
    with torch.device("meta"):
        model = GPT(config)
    want = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    for k in sorted(want.keys() | sd.keys()):
        if k not in sd or k not in want or tuple(sd[k].shape) != want[k]:
            got = "missing" if k not in sd else "unexpected" if k not in want else f"shape {tuple(sd[k].shape)}, config says {want[k]}"
            raise ValueError(f"{d}/model.safetensors: tensor {k}: {got}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)  # F32 stays memory-mapped
    return model

def save_pretrained(model: GPT, out_dir: str):
    """Write config.json + model.safetensors in the hub layout (no prefix, Conv1D weights (in, out), no lm_head)."""
    os.makedirs(out_dir, exist_ok=True)
    config = {**asdict(model.config), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
              "tie_word_embeddings": True}
    tensors = {k: (v.t() if k.endswith(CONV1D) else v) for k, v in model.state_dict().items()}
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
