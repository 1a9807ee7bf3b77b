"""GPT-2 (the book's chapters 4 and 5) and LoRA (exercise 7.4); below the divider the tool:
fast generation, NEFTune, Hugging Face checkpoints in and out."""
import warnings
from collections import OrderedDict
from dataclasses import dataclass
warnings.filterwarnings("ignore", "Failed to initialize NumPy")  # torch warns without numpy
import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def heads(self, x):
        """x (B, T, C) -> q, k, v, each (B, nh, T, hs): C split into nh heads of hs."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        shape = (B, T, self.n_head, C // self.n_head)
        return [t.view(shape).transpose(1, 2) for t in (q, k, v)]

    def forward(self, x):
        """x (B, T, C) -> (B, T, C): each position attends to itself and the ones before it."""
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).flatten(2))  # the heads side by side again

class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(c.n_embd, 4 * c.n_embd),
                                             gelu=nn.GELU(approximate="tanh"),
                                             c_proj=nn.Linear(4 * c.n_embd, c.n_embd)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        for name, p in self.named_parameters():  # N(0, 0.02), biases 0, LayerNorm 1: for tiny
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def pos_emb(self):  # the book's name for the position table: its rows are the context size
        return self.wpe

    def forward(self, idx):
        """idx (B, T) token ids -> logits (B, T, vocab)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        # the head is tied to the token embedding, as GPT-2's (the book trains a copy)
        return F.linear(self.ln_f(x), self.wte.weight)

# ---------------- generation (chapter 5)
@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """The book's generate: idx (B, T) -> (B, T + new), the most likely token each time, or with a
    temperature a sample (from the top_k most likely when given); stops at eos_id."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1]  # (B, vocab): the last position's
        if top_k is not None:
            kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1): each row's k-th largest
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
        else:
            idx_next = logits.argmax(dim=-1, keepdim=True)
        if eos_id is not None and bool((idx_next == eos_id).all()):  # every row at its end
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx

# ---------------- LoRA (exercise 7.4)
class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T, as peft (the book's appendix E: alpha alone)."""
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # starts at 0: y = base(x)

    def forward(self, x):  # through the rank-r bottleneck
        return self.base(x) + ((x @ self.A.t()) @ self.B.t()) * self.scale

def add_lora(model: GPT, rank: int, alpha: float) -> GPT:
    """Freeze every weight and wrap each Linear of the blocks in a LoRALinear."""
    model.requires_grad_(False)
    for module in list(model.h.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return model

# ================ the tool
import ctypes, http.client, json, math, os, pathlib, re, sys, urllib.request
from dataclasses import asdict, fields

EOT = 50256  # <|endoftext|>: GPT-2's end of text, its bos and eos token

def merge_lora(model: GPT) -> GPT:
    """Fold each adapter into its weight (W += scale * B A) and unwrap it: a plain GPT-2 again."""
    for module in list(model.h.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight.data += child.scale * child.B.data @ child.A.data
                setattr(module, name, child.base)
    return model.requires_grad_(True)

def add_neftune(model, alpha: float):
    """NEFTune (beyond the book): while training only, noise in +-alpha / sqrt(L * d) on wte."""
    def noisy(wte, inputs, embeddings):  # a forward hook: its result replaces wte's output
        if not wte.training:
            return embeddings
        bound = alpha / math.sqrt(embeddings.shape[1] * embeddings.shape[2])  # (B, L, d)
        return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)
    model.wte.register_forward_hook(noisy)

# ---------------- fast generation: a batch of prompts at once, with a KV cache
def cached_pass(model: GPT, idx, pos, mask, cache, start: int):
    """model(idx)'s last position for the tokens at cache columns start..; the keys and values
    before them come from cache (n_layer, 2, B, nh, S, hs); mask (B, 1, T, start+T)."""
    x = model.wte(idx) + model.wpe(pos)  # (B, T, C)
    end = start + idx.shape[1]
    for block, kv in zip(model.h, cache):
        q, k, v = block.attn.heads(block.ln_1(x))
        kv[:, :, :, start:end] = torch.stack((k, v))
        y = F.scaled_dot_product_attention(q, kv[0, :, :, :end], kv[1, :, :, :end], attn_mask=mask)
        x = x + block.attn.c_proj(y.transpose(1, 2).flatten(2))
        x = x + block.mlp(block.ln_2(x))
    return F.linear(model.ln_f(x[:, -1:]), model.wte.weight)  # (B, 1, vocab)

@torch.no_grad()
def generate_batch(model: GPT, prompts, max_new_tokens: int, temperature=0.0, top_k=None,
                   eos_id=None) -> list:
    """generate() for prompts (id lists, any lengths) at once, KV-cached: each one's new ids."""
    c = model.config
    device = model.wte.weight.device
    prompts = [p[-(c.n_positions - 1):] for p in prompts]  # an over-long prompt keeps its newest
    # each row's budget: its new tokens end where its positions reach the context's end
    budgets = [min(max_new_tokens, c.n_positions - len(p)) for p in prompts]
    P = max(map(len, prompts))
    S = P + max(budgets)  # cache columns: the longest prompt, then the largest budget
    pads = torch.tensor([P - len(p) for p in prompts], device=device)[:, None]  # (B, 1)
    column = torch.arange(S, device=device)
    # (B, S): each row's positions start at its first token; a row past its budget repeats its
    # last position, and what it generates there is dropped
    pos = (column - pads).clamp(0, c.n_positions - 1)
    causal = column[None, :] <= column[:, None]  # (S, S): a query sees keys up to its own
    # (B, S, S): causal and no padding; a pad query sees itself, so no row is all -inf
    mask = (causal & (column >= pads)[:, None, :]) | torch.eye(S, dtype=torch.bool, device=device)
    cache = torch.empty(c.n_layer, 2, len(prompts), c.n_head, S, c.n_embd // c.n_head,
                        device=device, dtype=model.wte.weight.dtype)
    ends = torch.tensor(budgets, device=device)
    def next_logits(idx):  # idx (B, P + new so far) -> (B, 1, vocab), as model(idx)[:, -1:]
        end = idx.shape[1]
        start = 0 if end == P else end - 1  # the prompts first, then one new token a pass
        logits = cached_pass(model, idx[:, start:], pos[:, start:end],
                             mask[:, None, start:end, :end], cache, start)
        if eos_id is not None:  # a row at its end or its budget answers end-of-text from now on
            done = (idx[:, P:] == eos_id).any(dim=1) | (end - P >= ends)
            logits[done] = float("-inf")
            logits[done, :, eos_id] = 0.0
        return logits
    x = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)  # left-padded
    rows = generate(next_logits, x, max(budgets), S, temperature, top_k, eos_id)[:, P:].tolist()
    rows = [r[:budget] for r, budget in zip(rows, budgets)]
    return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]

# ---------------- safetensors
HERE = os.path.dirname(os.path.abspath(__file__))
TIKTOKEN_CACHE = os.path.join(HERE, "data", "tiktoken-cache")  # GPT-2's BPE files, shipped
TOKENIZER_FILES = {  # the hub's names: tiktoken's cache names (SHA-1s of their URLs)
    "vocab.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",  # encoder.json
    "merges.txt": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"}  # vocab.bpe
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}

def read_safetensors(path) -> dict:
    """Memory-map a .safetensors file into {name: tensor}; a malformed file is one ValueError."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # then n bytes of JSON header
            if 8 + n > size:
                raise ValueError(f"a {n}-byte header does not fit in {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        # a private copy-on-write map: pages load as tensors touch them; no write reaches the file
        storage = torch.UntypedStorage.from_file(str(path), False, size)
        data = torch.empty(0, dtype=torch.uint8).set_(storage)[8 + n:]
        tensors = {}
        for name, info in header.items():
            shape = info["shape"]
            dtype = DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if not (0 <= begin <= end <= len(data) and end - begin == nbytes):
                wrong = f"bytes {begin} to {end} cannot hold {dtype} {shape}"
                raise ValueError(f"tensor {name}: {wrong}")

            t = data[begin:end]
            if t.storage_offset() % dtype.itemsize:  # a view must start at a multiple of it
                t = t.clone()
            tensors[name] = t.view(dtype).view(shape)
        return tensors
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        reason = f"{type(e).__name__}: {e}"  # a KeyError's text is just the key
        raise ValueError(f"{path}: not a valid safetensors file ({reason})") from None

def _atomic_write(path, write):
    """write(f) to a temp file, fsync, rename over path: never a half file."""
    root, extension = os.path.splitext(path)
    tmp = f"{root}.tmp{extension}"  # a fixed name: killed writes never pile up
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

def write_text(path, text: str):
    _atomic_write(path, lambda f: f.write(text.encode()))

def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """{name: tensor} -> a .safetensors file, the tensors 8-byte aligned."""
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
            f.write((ctypes.c_char * blob.numel()).from_address(blob.data_ptr()))
    _atomic_write(path, write)

# ---------------- Hugging Face checkpoints
ALIASES = {a: f"openai-community/{a}" for a in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, never "." or ".."
DOWNLOAD_TIMEOUT = 60  # seconds for the server's next bytes
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

def cache_dir(*parts) -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "gpt2-sft", *parts)

def download(url: str, dest: str, check, hint: str):
    """Fetch url into dest, whole and valid (check(path) raises ValueError), or not at all."""
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)  # follows redirects
    except (OSError, http.client.HTTPException, ValueError) as e:  # 404, refused, not HTTP
        raise ValueError(f"cannot download {url} ({getattr(e, 'reason', e)}); {hint}") from None
    def copy_body(f):
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
        f.flush()  # check reads the file
        try:
            check(f.name)
        except ValueError as e:  # a proxy's login page, say
            raise ValueError(f"{url} sent something else than the file ({e}); {hint}") from None
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with response:
        _atomic_write(dest, copy_body)

# transformers' GPT-2 options this model has one way: a checkpoint set otherwise is refused
GPT2_ONLY = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
             "tie_word_embeddings": (True,), "scale_attn_weights": (True,),
             "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,)}

def read_config(path) -> GPTConfig:
    """A checkpoint's config.json -> GPTConfig (the keys GPT-2 does not use are ignored)."""
    try:
        raw = dict(json.loads(pathlib.Path(path).read_text(encoding="utf-8")))
        config = GPTConfig(**{f.name: raw[f.name] for f in fields(GPTConfig) if f.name in raw})
    except (OSError, ValueError, TypeError) as e:  # TypeError: not a JSON object
        raise ValueError(f"{path}: not a readable GPT-2 config ({e})") from None
    for key, allowed in GPT2_ONLY.items():
        if raw.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{path}: {key} {raw[key]} (GPT-2's is {allowed[0]}): this GPT-2 "
                             "cannot represent that checkpoint")
    return config

def load_state(path) -> dict:
    """A checkpoint's weights under this GPT's names, as F32: Conv1D's (in, out) transposed."""
    state = {}
    for k, v in read_safetensors(path).items():
        k = k.removeprefix("transformer.")  # transformers' save_pretrained adds it
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers
            continue
        state[k] = (v.t() if k.endswith(CONV1D) else v).float()  # F32 stays memory-mapped
    head = state.pop("lm_head.weight", None)  # tied: a copy of wte
    if head is not None and not torch.equal(head, state.get("wte.weight")):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; this GPT-2 ties them")
    return state

def from_pretrained(name: str) -> GPT:
    """A GPT-2 in the Hugging Face layout: a local folder, an alias, or an owner/name repo."""
    folder = name
    if not os.path.isdir(name):  # a hub repo: its two files, downloaded into the cache once
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
    config = read_config(os.path.join(folder, "config.json"))
    state = load_state(os.path.join(folder, "model.safetensors"))
    try:
        with torch.device("meta"):
            model = GPT(config)  # no memory yet: the file's tensors are assigned below
        model.load_state_dict(state, assign=True)  # names any missing, extra or misshapen one
    except (TypeError, RuntimeError) as e:  # sizes that build no GPT, tensors that do not fit
        raise ValueError(f"{folder}: not a GPT-2 checkpoint that loads ({e})") from None
    return model

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
