"""GPT-2: the model, generation, LoRA, NEFTune; below the divider fast generation, checkpoints."""
import ctypes, http.client, json, math, os, pathlib, re, sys, urllib.error, urllib.request, warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
warnings.filterwarnings("ignore", "Failed to initialize NumPy")  # torch warns without numpy
import torch
import torch.nn as nn
import torch.nn.functional as F

EOT = 50256  # <|endoftext|>: GPT-2's end of text, its bos and eos token

@dataclass
class GPTConfig:
    vocab_size: int = 50257  # BPE tokens; the last one (50256) is <|endoftext|>
    n_positions: int = 1024  # longest context the position table covers
    n_embd: int = 768        # width of the residual stream
    n_layer: int = 12        # transformer blocks
    n_head: int = 12         # attention heads per block (n_embd % n_head == 0)
    layer_norm_epsilon: float = 1e-5

# ---------------- the model (chapter 4)
class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)  # q, k, v fused, as in the checkpoint
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x, mask=None, cache=None, start=0):
        """x (B, T, C) -> (B, T, C), causal. generate_batch() also passes a mask that hides left
        padding, and a KV cache holding the keys and values of the tokens before start."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        heads = (B, T, self.n_head, C // self.n_head)  # C split into nh heads of hs
        q = q.view(heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(heads).transpose(1, 2)
        v = v.view(heads).transpose(1, 2)
        if cache is not None:  # (2, B, nh, S, hs): store at [start, start+T), attend to all so far
            cache[:, :, :, start:start + T] = torch.stack((k, v))
            k, v = cache[:, :, :, :start + T]
        causal = mask is None  # generate_batch() brings its own causal mask, which also hides pads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(c.n_embd, 4 * c.n_embd),
                                             gelu=nn.GELU(approximate="tanh"),
                                             c_proj=nn.Linear(4 * c.n_embd, c.n_embd)))

    def forward(self, x, mask=None, cache=None, start=0):
        x = x + self.attn(self.ln_1(x), mask, cache, start)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), biases 0, LayerNorm 1
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, pos=None, mask=None, cache=None, start=0, last_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab); the other arguments: generate_batch()'s."""
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, mask, None if cache is None else cache[i], start)
        if last_only:  # generation needs the next token's logits only
            x = x[:, -1:]
        # the head is tied to the token embedding, as GPT-2's (the book trains a copy, out_head)
        return F.linear(self.ln_f(x), self.wte.weight)

# ---------------- generation (chapter 5)
def next_token(logits, temperature=0.0, top_k=None):
    """logits (B, vocab) -> ids (B, 1): the most likely, or with a temperature a sample (from the
    top_k most likely when given), as the book's chapter 5."""
    if top_k is not None:
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1): each row's k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1)
    return logits.argmax(dim=-1, keepdim=True)

@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """The book's generate: idx (B, T) -> (B, T + new), a whole forward per new token (the fast
    one is generate_batch); stops when every row's next token is eos_id, as the book for one row."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1]  # (B, vocab): the last position's
        token = next_token(logits, temperature, top_k)
        if eos_id is not None and bool((token == eos_id).all()):
            break
        idx = torch.cat((idx, token), dim=1)
    return idx

# ---------------- finetuning: LoRA (exercise 7.4), NEFTune
class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T, as peft (the book's appendix E: alpha alone)."""
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # starts at 0: y = base(x)

    def forward(self, x):  # through the rank-r bottleneck: no gradient work for the frozen weight
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
    """Fold each adapter into its weight (W += scale * B A) and unwrap it: a plain GPT-2 again."""
    _swap_linears(model, lambda m: m.merged() if isinstance(m, LoRALinear) else m)
    return model.requires_grad_(True)

def add_neftune(model, alpha: float):
    """NEFTune (beyond the book): while training only, noise in +-alpha / sqrt(L * d) on wte."""
    def noisy(wte, inputs, embeddings):  # a forward hook: what it returns replaces wte's output
        if not wte.training:
            return embeddings
        bound = alpha / math.sqrt(embeddings.shape[1] * embeddings.shape[2])  # (B, L, d): L and d
        return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)
    model.wte.register_forward_hook(noisy)

# ================ the tool: checkpoints in and out, fast generation; none of it the chapter
# ---------------- fast generation: a batch of prompts at once, with a KV cache
@torch.no_grad()
def generate_batch(model: GPT, prompts, max_new_tokens: int, temperature=0.0, top_k=None,
                   eos_id=None) -> list:
    """generate() for prompts (id lists, any lengths) at once, KV-cached: each one's new ids."""
    c = model.config
    device = model.wte.weight.device
    prompts = [p[-(c.n_positions - 1):] for p in prompts]  # an over-long prompt keeps its newest
    # each row's own budget: its new tokens end where its positions reach the context's end
    budgets = [min(max_new_tokens, c.n_positions - len(p)) for p in prompts]
    P = max(map(len, prompts))
    S = P + max(budgets)  # cache columns: the longest prompt, then the largest budget
    pads = torch.tensor([P - len(p) for p in prompts], device=device)[:, None]  # (B, 1)
    x = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)  # left-padded
    column = torch.arange(S, device=device)
    # (B, S): each row's positions start at its first token; a row past its budget repeats its
    # last position, and what it generates there is dropped
    pos = (column - pads).clamp(0, c.n_positions - 1)
    causal = column[None, :] <= column[:, None]  # (S, S): a query sees keys up to its own
    # (B, S, S): causal and no padding; a pad query sees itself, so no row is all -inf
    mask = (causal & (column >= pads)[:, None, :]) | torch.eye(S, dtype=torch.bool, device=device)
    cache = torch.empty(c.n_layer, 2, len(prompts), c.n_head, S, c.n_embd // c.n_head,
                        device=device, dtype=model.wte.weight.dtype)
    out = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    last_step = torch.tensor(budgets, device=device) - 1  # (B,)
    start = 0
    for step in range(S - P):
        T = x.shape[1]
        step_mask = mask[:, None, start:start + T, :start + T]  # (B, 1, T, start+T)
        logits = model(x, pos[:, start:start + T], step_mask, cache, start, last_only=True)
        token = next_token(logits[:, -1], temperature, top_k)[:, 0]  # (B,)
        out.append(token)
        done |= (token == eos_id) | (last_step <= step)
        if done.all():
            break
        start += T
        x = token[:, None]
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    rows = [r[:budget] for r, budget in zip(rows, budgets)]
    return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]

# ---------------- safetensors
HERE = os.path.dirname(os.path.abspath(__file__))
TIKTOKEN_CACHE = os.path.join(HERE, "data", "tiktoken-cache")  # GPT-2's BPE files, shipped
TOKENIZER_FILES = {  # the hub's names for them: tiktoken's (SHA-1s of their URLs) for its cache
    "vocab.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",  # tiktoken's encoder.json
    "merges.txt": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"}  # tiktoken's vocab.bpe
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}

def _tensors(path, size: int) -> dict:
    """The header, then each tensor: a known dtype, its bytes inside the data, its shape's size."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # the header's length, then n bytes of JSON
        if size < 8 or 8 + n > size:
            raise ValueError(f"a {n}-byte header does not fit in {size} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    # a private copy-on-write map: pages load as tensors touch them; writes never reach the file
    storage = torch.UntypedStorage.from_file(str(path), False, size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage)[8 + n:]
    tensors = {}
    for name, info in header.items():
        shape = info["shape"]
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        inside = 0 <= begin <= end <= len(data)
        if not inside or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name}: bytes {begin} to {end} cannot hold {dtype} {shape}")
        t = data[begin:end]
        if t.storage_offset() % dtype.itemsize:
            t = t.clone()  # a view must start at a multiple of its item size: copy a misaligned one
        tensors[name] = t.view(dtype).view(shape)
    return tensors

def read_safetensors(path) -> dict:
    """Memory-map a .safetensors file into {name: tensor}; a malformed file is one ValueError."""
    try:
        return _tensors(path, os.path.getsize(path))
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:  # any malformation
        reason = f"{type(e).__name__}: {e}"  # KeyError's own text is just the key
        raise ValueError(f"{path}: not a valid safetensors file ({reason})") from None

def _atomic_write(path, write, check=lambda tmp: None):
    """write(f) to a temp file, fsync, check(temp), rename over path: never a half or bad file."""
    root, extension = os.path.splitext(path)
    tmp = f"{root}.tmp{extension}"  # one fixed name: a killed write is overwritten, never piles up
    try:
        with open(tmp, "wb") as f:  # a new file's mode follows the umask
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check(tmp)  # a download's own check, before the file is in place
        os.replace(tmp, path)
    except OSError as e:  # a full disk or a read-only folder: name the file
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):  # whatever failed, no temp file stays behind
            os.unlink(tmp)

def write_text(path, text: str):
    _atomic_write(path, lambda f: f.write(text.encode()))

def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """{name: tensor} -> a .safetensors file; the header is padded so tensors are 8-byte aligned."""
    header = {"__metadata__": metadata} if metadata else {}
    dtype_names = {t: name for name, t in DTYPES.items()}
    blobs = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()]
    offset = 0
    for (name, t), blob in zip(tensors.items(), blobs):
        offsets = [offset, offset + blob.numel()]
        header[name] = {"dtype": dtype_names[t.dtype], "shape": [*t.shape], "data_offsets": offsets}
        offset += blob.numel()
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for blob in blobs:  # no buffer protocol without numpy: hand write() the raw memory
            if blob.numel():
                f.write((ctypes.c_char * blob.numel()).from_address(blob.data_ptr()))
    _atomic_write(path, write)

# ---------------- Hugging Face checkpoints
ALIASES = {a: f"openai-community/{a}" for a in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, never "." or ".."
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
DOWNLOAD_TIMEOUT = 60  # seconds to wait for the server's next bytes

def cache_dir(*parts) -> str:
    """$XDG_CACHE_HOME/gpt2-sft/... (default ~/.cache/gpt2-sft/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "gpt2-sft", *parts)

def _copy_body(response, f, url: str):
    """The response body into f, with a progress line; a body cut short is an error."""
    try:
        for chunk in iter(lambda: response.read(1 << 22), b""):
            f.write(chunk)
            print(f"\rdownloading {url}: {f.tell() / 1e6:.0f} MB", end="", file=sys.stderr)
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:  # a stall, a reset
        raise ValueError(f"the download of {url} broke off ({type(e).__name__})") from None
    finally:
        print(file=sys.stderr)
    total = response.headers.get("Content-Length")
    if total is not None and f.tell() != int(total):  # http.client ends a short body quietly
        raise ValueError(f"the download of {url} stopped at {f.tell()} of {total} bytes")

def download(url: str, dest: str, check, hint: str):
    """Fetch url into dest, whole and valid (check(path) raises ValueError), or not at all."""
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)  # follows redirects
    except (OSError, http.client.HTTPException, ValueError) as e:  # 404, refused, timeout, not HTTP
        raise ValueError(f"cannot download {url} ({getattr(e, 'reason', e)}); {hint}") from None
    def check_download(tmp):
        try:
            check(tmp)
        except ValueError as e:  # a proxy's login page, say
            raise ValueError(f"{url} sent something else than the file ({e}); {hint}") from None
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with response:
        _atomic_write(dest, lambda f: _copy_body(response, f, url), check_download)

# GPT-2 options of transformers that this model has one way: a checkpoint set otherwise is refused
GPT2_ONLY = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
             "tie_word_embeddings": (True,), "scale_attn_weights": (True,),
             "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,)}

def read_config(path) -> GPTConfig:
    """A checkpoint's config.json -> GPTConfig (the keys GPT-2 does not use are ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = dict(json.load(f))
        config = GPTConfig(**{f.name: raw[f.name] for f in fields(GPTConfig) if f.name in raw})
    except (OSError, ValueError, TypeError) as e:  # TypeError: not a JSON object
        raise ValueError(f"{path}: not a readable GPT-2 config ({e})") from None
    for key, allowed in GPT2_ONLY.items():
        if raw.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{path}: {key} {raw[key]} (GPT-2's is {allowed[0]}): this GPT-2 "
                             "cannot represent that checkpoint")
    return config

def _load_folder(folder: str) -> GPT:
    config = read_config(os.path.join(folder, "config.json"))
    path = os.path.join(folder, "model.safetensors")
    state = {}
    for k, v in read_safetensors(path).items():
        k = k.removeprefix("transformer.")  # transformers' save_pretrained adds it
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers carry nothing we need
        v = v.t() if k.endswith(CONV1D) else v  # Conv1D weights are stored (in, out)
        state[k] = v.float()  # F16 and BF16 load as F32; F32 stays memory-mapped
    head = state.pop("lm_head.weight", None)  # the head is tied: a copy of wte adds nothing
    if head is not None and not torch.equal(head, state.get("wte.weight")):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; this GPT-2 ties them")
    with torch.device("meta"):
        model = GPT(config)  # no memory yet: the file's tensors are assigned below
    model.load_state_dict(state, assign=True)  # names every missing, extra or misshapen tensor
    return model

def from_pretrained(name: str) -> GPT:
    """A GPT-2 in the Hugging Face layout: a local folder, an alias, or an owner/name repo."""
    folder = name
    if not os.path.isdir(name):  # a hub repo: its two files are downloaded into the cache once
        repo = ALIASES.get(name, name)
        if not REPO.fullmatch(repo):
            raise ValueError(f"model {name}: no such folder, nor a Hugging Face repo owner/name")
        folder = cache_dir(repo)
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        hint = "--model takes a GPT-2 repo (gpt2-medium, owner/name) or a folder; HF_ENDPOINT a mirror"
        for file, check in (("config.json", read_config), ("model.safetensors", read_safetensors)):
            dest = os.path.join(folder, file)
            if not os.path.exists(dest):  # a file is there only when whole and checked
                download(f"{endpoint}/{repo}/resolve/main/{file}", dest, check, hint)
    try:
        return _load_folder(folder)
    except (TypeError, RuntimeError) as e:  # sizes that build no GPT, tensors that do not fit it
        raise ValueError(f"{folder}: not a GPT-2 checkpoint that loads ({e})") from None

def save_pretrained(model: GPT, out_dir: str):
    """A whole Hugging Face GPT-2 folder: config, weights (Conv1D (in, out)), tokenizer files."""
    os.makedirs(out_dir, exist_ok=True)
    config = {**asdict(model.config), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
              "activation_function": "gelu_new", "tie_word_embeddings": True,
              "n_ctx": model.config.n_positions, "bos_token_id": EOT, "eos_token_id": EOT}
    tensors = {k: v.t() if k.endswith(CONV1D) else v for k, v in model.state_dict().items()}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "pt"})
    write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2))
    for name, cached in TOKENIZER_FILES.items():  # copied byte for byte, never re-serialised
        data = pathlib.Path(TIKTOKEN_CACHE, cached).read_bytes()
        _atomic_write(os.path.join(out_dir, name), lambda f: f.write(data))
