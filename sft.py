"""Instruction finetuning of GPT-2: data -> prompts -> tokens -> batches -> training -> responses, and the CLI."""
import argparse, hashlib, json, math, os, shutil, sys, time, urllib.parse
from dataclasses import asdict, dataclass, field, fields

try:
    import fcntl  # advisory file locks (Linux, macOS)
except ImportError:  # Windows: one training per --out is then up to you
    fcntl = None

import judge
try:  # torch takes seconds to import: Ctrl-C meanwhile is one line too
    from gpt import GPT, GPTConfig, add_lora, cache_dir, download, from_pretrained, generate, merge_lora
    from gpt import save_pretrained, write_text
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence
    import tiktoken
except KeyboardInterrupt:
    sys.exit("interrupted")

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "instruction-data.json")  # the book's 1,100 entries, shipped (Apache-2.0)
EOT = 50256      # <|endoftext|>: pads the batches and is the one end target each row keeps
IGNORE = -100    # targets that cross_entropy skips
RUN_FILE = "run.json"  # the training settings that eval and generate rebuild the data and prompts from
SPLIT = (0.85, 0.10)  # train and test fractions, as the book; validation gets the rest
STYLES = {  # (instruction, input when non-empty, response marker)
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
               "\n\n### Instruction:\n{instruction}", "\n\n### Input:\n{input}", "\n\n### Response:\n"),
    "phi3": ("<|user|>\n{instruction}", "\n{input}", "\n<|assistant|>\n"),
}

# ---------------------------------------------------------------- data
def _loads(text: str, path: str, first_line: int = 1):
    """json.loads with errors that name the file and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = first_line + e.lineno - 1
        raise ValueError(f"{path}: malformed JSON at line {line}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{path}: the JSON is nested too deeply") from None


def read_entries(path: str) -> list:
    """A local JSON list (or .jsonl, one entry a line) of {instruction, input?, output}, every entry checked."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ValueError(f"{path}: cannot read the data ({reason}); pass --data PATH or URL") from None
    if path.endswith(".jsonl"):  # split on \n only: str.splitlines() also splits inside strings, at U+2028
        data = [_loads(line, path, i + 1) for i, line in enumerate(text.split("\n")) if line.strip()]
    else:
        data = _loads(text, path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, found a {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} is a {type(entry).__name__}, not an object with instruction/input/output")
        for key in ("instruction", "input", "output"):
            if key not in entry:
                if key != "input":  # the only optional key
                    raise ValueError(f"{path}: entry {i}: {key!r} is missing")
            elif not isinstance(entry[key], str):
                raise ValueError(f"{path}: entry {i}: {key!r} must be a string, not {type(entry[key]).__name__}")
    return data


def load_entries(source: str = DATA) -> list:
    """Entries from a local path, or from a URL downloaded once into the cache (checked before it is kept)."""
    if not source.startswith(("http://", "https://")):
        return read_entries(source)
    suffix = ".jsonl" if urllib.parse.urlsplit(source).path.endswith(".jsonl") else ".json"
    path = os.path.join(cache_dir("data"), hashlib.sha1(source.encode()).hexdigest()[:16] + suffix)
    if not os.path.exists(path):
        try:
            download(source, path, read_entries)
        except ValueError as e:
            raise ValueError(f"{e}; check the URL, or pass a local file with --data PATH") from None
    return read_entries(path)


def format_prompt(entry: dict, style: str = "alpaca") -> str:
    """The prompt up to and including the response marker; training appends the output, inference generates it."""
    head, extra, marker = STYLES[style]
    return head.format(instruction=entry["instruction"]) + (extra.format(input=entry["input"]) if entry.get("input") else "") + marker

def split(entries: list, source: str = "data") -> tuple:
    """(train, val, test) in file order, with the book's arithmetic: 935 / 55 / 110 of 1,100."""
    n_train, n_test = int(SPLIT[0] * len(entries)), int(SPLIT[1] * len(entries))
    train, test, val = entries[:n_train], entries[n_train:n_train + n_test], entries[n_train + n_test:]
    if not (train and val and test):
        raise ValueError(f"{source}: {len(entries)} entries are too few to split into train, validation and test (need at least 10)")
    return train, val, test

def tokenizer():
    """tiktoken's gpt2 encoding; its BPE files ship in data/tiktoken-cache, so no download is needed."""
    # a cache folder the user chose wins; tiktoken checks the files' hashes either way
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "data", "tiktoken-cache"))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # a chosen cache without the files: tiktoken tries to download, and offline it fails
        cache = os.environ["TIKTOKEN_CACHE_DIR"]
        raise ValueError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}) with TIKTOKEN_CACHE_DIR={cache}; "
                         "unset it to use the shipped files") from None

def tokenize(entries: list, enc, style: str = "alpaca") -> list:
    """[(ids, prompt_len)]: ids = enc(prompt) + enc(output); <|endoftext|> in the text stays plain text."""
    prompts = enc.encode_ordinary_batch([format_prompt(e, style) for e in entries])
    return [(p + o, len(p)) for p, o in zip(prompts, enc.encode_ordinary_batch([e["output"] for e in entries]))]

def collate(batch, pad_id=EOT, ignore_index=IGNORE, max_length=None, mask_prompt=False):
    """[(ids, prompt_len)] -> inputs, targets (B, T), T the longest row (at most max_length); CPU tensors."""
    n = torch.tensor([len(ids) for ids, _ in batch])[:, None]        # (B, 1) row lengths
    p = torch.tensor([plen for _, plen in batch])[:, None]            # (B, 1) prompt lengths
    seq = pad_sequence([torch.tensor(ids + [pad_id]) for ids, _ in batch], batch_first=True, padding_value=pad_id)
    col = torch.arange(seq.shape[1] - 1)[None]                       # (1, T)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()                # target at n-1 is the appended end-of-text
    targets[(col >= n) | (col < p - 1) & mask_prompt] = ignore_index  # by position, never by value: an id 50256 stays
    return (inputs[:, :max_length], targets[:, :max_length]) if max_length else (inputs, targets)

# ---------------------------------------------------------------- loss and training
def opt(default, help):
    return field(default=default, metadata={"help": help})

@dataclass
class TrainConfig:
    model: str = opt("gpt2-medium", "gpt2[-medium|-large|-xl], owner/name, a local folder, or tiny (random, no download)")
    data: str = opt(DATA, "instruction data: a JSON/JSONL path or URL (default: the book's, shipped in data/)")
    out: str = opt(None, "run directory (default: runs/<model name>)")
    style: str = opt("alpaca", "prompt style (exercise 7.1)")
    mask_prompt: bool = opt(False, "no loss on the prompt tokens (exercise 7.2)")
    epochs: int = opt(2, "passes over the training split")
    batch_size: int = opt(8, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step, token-weighted (exercise 7.3)")
    lr: float = opt(None, "AdamW learning rate (default: the book's 5e-5; 1e-3 for tiny, which starts from random)")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    max_length: int = opt(1024, "truncate rows to this many tokens (and to the model's context)")
    lora_rank: int = opt(0, "train low-rank adapters of this rank instead of all weights (exercise 7.4; 0: off)")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: updates are (alpha / rank) * B A")
    eval_every: int = opt(5, "optimizer steps between loss reports")
    limit: int = opt(0, "keep only the first N entries before the split (0: all)")
    seed: int = opt(123, "seed for the shuffling and the tiny model")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, mps")

    def __post_init__(self):
        if self.lr is None:
            self.lr = 1e-3 if self.model == "tiny" else 5e-5
        if self.out is None:
            self.out = os.path.join("runs", os.path.basename(self.model.rstrip("/")))
        for f in fields(self):  # argparse gives the right types; a hand-edited run.json may not
            value = getattr(self, f.name)
            kinds = (int, float) if f.type is float else (f.type,)
            if type(value) not in kinds:
                raise ValueError(f"{f.name} must be of type {f.type.__name__}, not {value!r}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "eval_every", "lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, not {getattr(self, name)}")
        for name in ("weight_decay", "limit", "lora_rank", "lora_alpha"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, not {getattr(self, name)}")
        if self.style not in STYLES:
            raise ValueError(f"--style {self.style}: not one of {', '.join(STYLES)}")
        for name in ("data", "model"):  # absolute, so eval and generate work from any folder
            if os.path.exists(getattr(self, name)):
                setattr(self, name, os.path.abspath(getattr(self, name)))


def pick_device(name: str) -> torch.device:
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls where there is a GPU
    torch.backends.cudnn.allow_tf32 = True
    auto = "cpu"
    if torch.cuda.is_available():
        auto = "cuda"
    elif torch.backends.mps.is_available():
        auto = "mps"
    if name == "auto":
        name = auto
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name; use auto (which picks {auto}) or cpu") from None
    if device.type not in (auto, "cpu"):
        raise ValueError(f"--device {name} is not available here; use auto (which picks {auto}) or cpu")
    return device


def load_model(name: str, seed: int = 0) -> GPT:
    """tiny: a random small GPT-2 with the GPT-2 vocabulary (7M parameters); anything else: from_pretrained."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_embd=128, n_layer=4, n_head=4)) if name == "tiny" else from_pretrained(name)
    if model.config.vocab_size < EOT + 1:
        raise ValueError(f"model {name} has {model.config.vocab_size} tokens; the GPT-2 tokenizer needs {EOT + 1}")
    return model

def loss_sum(model, inputs, targets, device):
    """Cross-entropy summed over the non-ignored targets (divide by their count for the token-weighted mean)."""
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(inputs)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def loss_and_backward(model, micro_batches, device):
    """Gradients of the token-weighted mean loss over [(inputs, targets)]: the same as one batch of them all."""
    count = sum(int((t != IGNORE).sum()) for _, t in micro_batches)  # counted on the CPU: no device sync
    count = max(count, 1)
    losses = []
    for inputs, targets in micro_batches:
        losses.append(loss_sum(model, inputs, targets, device))
        (losses[-1] / count).backward()  # each part divided by the whole count, not its own
    return sum(losses).detach(), count


def batches(rows, cfg: TrainConfig) -> list:
    """rows -> [(inputs, targets)] in batches of cfg.batch_size, with the run's truncation and masking."""
    out = []
    for i in range(0, len(rows), cfg.batch_size):
        out.append(collate(rows[i:i + cfg.batch_size], max_length=cfg.max_length, mask_prompt=cfg.mask_prompt))
    return out


@torch.no_grad()
def mean_loss(model, rows, cfg, device) -> float:
    """The token-weighted mean loss over rows (not a mean of batch means)."""
    parts = batches(rows, cfg)
    count = max(sum(int((y != IGNORE).sum()) for _, y in parts), 1)
    return sum(loss_sum(model, x, y, device).item() for x, y in parts) / count


def target_rows(rows, cfg: TrainConfig) -> int:
    """How many rows keep at least one target after truncation (and prompt masking)."""
    first_target = 0
    kept = 0
    for ids, prompt_len in rows:
        if cfg.mask_prompt:
            first_target = prompt_len - 1  # the column that predicts the first response token
        kept += first_target < min(len(ids), cfg.max_length)
    return kept


def claim_out(out: str):
    """Check --out can be written and lock it (a second training into it is refused); returns the lock's file."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a run folder; pick another --out")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        lock = open(f"{out}.lock", "w")  # beside the folder, which save_run swaps
    except OSError as e:
        raise ValueError(f"cannot write the run folder {out} ({e.strerror or e}); pick another --out") from None
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends, however it ends
        except OSError:
            raise ValueError(f"another training is writing {out}; wait for it, or pick another --out") from None
    return lock


def save_run(model, cfg: TrainConfig, metrics: list):
    """Write the whole run into a new folder, then swap it in: --out never mixes two runs' files."""
    staging = cfg.out + ".saving"
    old = cfg.out + ".old"
    for leftover in (staging, old):  # from a save that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    save_pretrained(model, staging)
    write_text(os.path.join(staging, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
    write_text(os.path.join(staging, "loss.svg"), loss_svg(metrics))
    write_text(os.path.join(staging, RUN_FILE), json.dumps(asdict(cfg), indent=2))
    if os.path.exists(cfg.out):
        os.rename(cfg.out, old)  # the previous run, responses and scores included, goes as a whole
    os.rename(staging, cfg.out)
    shutil.rmtree(old, ignore_errors=True)


def prepare_rows(cfg: TrainConfig, model, enc):
    """The train and validation rows, checked: a step takes rows_per_step rows, and every split keeps targets."""
    train_e, val_e, test_e = split(load_entries(cfg.data)[:cfg.limit or None], cfg.data)
    cfg.max_length = min(cfg.max_length, model.config.n_positions)  # the position table ends there
    train_rows = tokenize(train_e, enc, cfg.style)
    val_rows = tokenize(val_e, enc, cfg.style)
    cut = sum(len(ids) > cfg.max_length for ids, _ in train_rows + val_rows)
    log(f"data: {len(train_e)} train / {len(val_e)} validation / {len(test_e)} test entries; "
        f"{cut} cut to --max-length {cfg.max_length}")
    for name, rows in (("training", train_rows), ("validation", val_rows)):
        if target_rows(rows, cfg) == 0:
            raise ValueError(f"no {name} row keeps a response token within --max-length {cfg.max_length} "
                             "(--mask-prompt masks the prompts); raise --max-length")
    if len(train_rows) < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"--batch-size x --grad-accum = {cfg.batch_size * cfg.grad_accum} is more than "
                         f"the {len(train_rows)} training entries")
    return train_rows, val_rows, val_e


def train(cfg: TrainConfig):
    lock = claim_out(cfg.out)  # before any work: an unwritable --out must not cost a training
    enc = tokenizer()
    device = pick_device(cfg.device)
    model = load_model(cfg.model, cfg.seed).to(device)
    train_rows, val_rows, val_e = prepare_rows(cfg, model, enc)
    if cfg.lora_rank:
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.model} on {device}, {sum(p.numel() for p in params):,} trainable of {total:,} parameters")
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)

    def sample(epoch):  # as the book: one validation answer after each epoch
        answer = respond(model, val_e[:1], enc, cfg.style, 50)[0]
        log(f"epoch {epoch} sample response to {val_e[0]['instruction']!r}: {answer!r}")
    metrics = run_steps(model, optimizer, train_rows, val_rows, cfg, device, sample)
    save_run(merge_lora(model), cfg, metrics)  # adapters folded in: the run is a plain GPT-2 checkpoint
    lock.close()


def run_steps(model, optimizer, train_rows, val_rows, cfg: TrainConfig, device, at_epoch_end) -> list:
    """The training loop: shuffled batches (the last partial one dropped, as the book), reports every eval_every."""
    rows_per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = len(train_rows) // rows_per_step
    steps = steps_per_epoch * cfg.epochs
    # each report measures the same validation rows; one epoch's reports cost one pass over the set
    reports_per_epoch = max(steps_per_epoch // cfg.eval_every, 1)
    subset = val_rows[:math.ceil(len(val_rows) / reports_per_epoch)]
    log(f"training: lr {cfg.lr:g}, effective batch {rows_per_step} ({cfg.batch_size} x {cfg.grad_accum}), "
        f"{steps} steps; validation: all {len(val_rows)} rows at the start and end, "
        f"the first {len(subset)} at each report" + ("; losses cover the responses only" if cfg.mask_prompt else ""))
    first = dict(step=0, epoch=0, tokens=0, train_loss=mean_loss(model, train_rows[:cfg.batch_size], cfg, device),
                 val_loss=mean_loss(model, val_rows, cfg, device), seconds=0.0)
    metrics = [first]
    log(f"initial loss: train {first['train_loss']:.3f}, validation {first['val_loss']:.3f} (all rows)")
    shuffle = torch.Generator().manual_seed(cfg.seed)
    running_loss = torch.zeros((), device=device)  # summed on the device: no sync per step
    running_count = 0
    tokens = 0
    started = time.time()
    for step in range(1, steps + 1):
        epoch = (step - 1) // steps_per_epoch + 1
        i = (step - 1) % steps_per_epoch
        if i == 0:
            order = torch.randperm(len(train_rows), generator=shuffle).tolist()
        batch = [train_rows[j] for j in order[i * rows_per_step:(i + 1) * rows_per_step]]
        micro = [collate(batch[k:k + cfg.batch_size], max_length=cfg.max_length, mask_prompt=cfg.mask_prompt)
                 for k in range(0, rows_per_step, cfg.batch_size)]
        loss, count = loss_and_backward(model, micro, device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running_loss += loss
        running_count += count
        tokens += sum(min(len(ids), cfg.max_length) for ids, _ in batch)
        if step % cfg.eval_every == 0 or step == steps:
            rows = val_rows if step == steps else subset
            seconds = time.time() - started
            train_loss = running_loss.item() / running_count
            metrics.append(dict(step=step, epoch=epoch, tokens=tokens, train_loss=train_loss,
                                val_loss=mean_loss(model, rows, cfg, device), seconds=round(seconds, 2)))
            if not math.isfinite(train_loss):
                raise ValueError(f"training diverged (train loss {train_loss} at step {step}); lower --lr")
            running_loss.zero_()
            running_count = 0
            log(f"epoch {epoch} step {step}/{steps}: train {train_loss:.3f}, validation {metrics[-1]['val_loss']:.3f} "
                f"({len(rows)} rows), {tokens / seconds:,.0f} tokens/s, {seconds:.0f}s elapsed, "
                f"{seconds * (steps - step) / step:.0f}s to go")
        if i == steps_per_epoch - 1:
            at_epoch_end(epoch)
    log(f"trained {steps} steps in {time.time() - started:.1f}s; validation loss {metrics[-1]['val_loss']:.3f}")
    return metrics


def loss_svg(metrics, w=640, h=400, pad=50) -> str:
    """Train and validation loss against steps, as a hand-written SVG line chart."""
    top, right = max(max(m["train_loss"], m["val_loss"]) for m in metrics) * 1.05, max(metrics[-1]["step"], 1)
    def line(key, name, color, y):
        pts = " ".join(f"{pad + m['step'] / right * (w - 2 * pad):.1f},{h - pad - m[key] / top * (h - 2 * pad):.1f}" for m in metrics)
        return f'<polyline id="{name}" stroke="{color}" stroke-width="2" fill="none" points="{pts}"/>\n<text x="{w - pad - 90}" y="{y}" fill="{color}">{name}</text>\n'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">\n'
            f'<rect width="{w}" height="{h}" fill="white"/><path d="M{pad},{pad} V{h - pad} H{w - pad}" stroke="black" fill="none"/>\n'
            f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">step (last {right})</text><text x="10" y="{pad - 10}">loss (top {top:.2f})</text>\n'
            + line("train_loss", "train", "#1f77b4", pad) + line("val_loss", "validation", "#ff7f0e", pad + 16) + "</svg>\n")

# ---------------------------------------------------------------- responses
def respond(model, entries, enc, style="alpaca", max_new_tokens=256, batch_size=32) -> list:
    """Greedy answers to each entry's prompt, batched shortest first; the text of the new tokens only."""
    prompts = [enc.encode_ordinary(format_prompt(e, style)) for e in entries]
    order, out = sorted(range(len(prompts)), key=lambda i: len(prompts[i])), [""] * len(prompts)
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        for i, ids in zip(chunk, generate(model, [prompts[i] for i in chunk], max_new_tokens, eos_id=EOT)):
            out[i] = enc.decode(ids).strip()
    return out

def load_run(out: str, device: str):
    """The trained model and the settings of a run directory written by train."""
    path = os.path.join(out, RUN_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{out}: holds no trained run (no {RUN_FILE}); train one with python sft.py train --out {out}")
    with open(path, encoding="utf-8") as f:
        settings = _loads(f.read(), path)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not a JSON object of training settings")
    unknown = settings.keys() - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown setting {sorted(unknown)[0]!r}")
    try:
        cfg = TrainConfig(**settings)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return load_model(out).to(pick_device(device)), cfg


def generate_command(a):
    """generate: the response alone on stdout, so it composes in pipes."""
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, not {a.max_new_tokens}")
    model, cfg = load_run(a.out, a.device)
    entry = {"instruction": a.instruction, "input": a.input}
    print(respond(model, [entry], tokenizer(), cfg.style, a.max_new_tokens)[0])


def scores_path(responses_path: str) -> str:
    """Scores live beside their responses, under a name derived from them: X.json -> X-scores.json."""
    stem = responses_path.removesuffix(".json")
    return stem + "-scores.json"


def judge_file(path: str, model: str, key: str, url, timeout) -> dict:
    """Score every entry's response; writes X-scores.json (each entry with its score) beside X.json."""
    entries = read_entries(path)
    for i, e in enumerate(entries):
        if not isinstance(e.get(key), str):
            raise ValueError(f"{path}: entry {i} has no string {key!r}; pick the field with --key")
    asked = [e for e in entries if e[key].strip()]  # an empty response scores 0 without asking
    marker = STYLES["alpaca"][2]
    prompts = [judge.judge_prompt(format_prompt(e).removesuffix(marker), e["output"], e[key]) for e in asked]
    journal = scores_path(path) + "l"  # X-scores.jsonl: one line per score as it comes
    answers = iter(judge.score_all(prompts, journal, model, url, timeout))
    scores = [next(answers) if e[key].strip() else 0 for e in entries]
    result = judge.summary(scores, model)
    result["entries"] = [{**e, "score": s} for e, s in zip(entries, scores)]
    write_text(scores_path(path), json.dumps(result, indent=2))
    average = result["average"] or 0
    print(f"Average score: {average:.2f} ({result['scored']} of {result['total']} scored)")
    return result


def judge_command(a):
    judge_file(a.file, a.judge, a.key, a.url, a.timeout)


def eval_command(a):
    """eval: the test split's responses, saved, then scored by the judge (checked first)."""
    model, cfg = load_run(a.out, a.device)
    judge_problem = None
    try:
        judge.preflight(a.judge, a.url)
    except ValueError as e:  # say so now, not after the responses
        judge_problem = str(e)
        log(f"warning: {e}; the responses will still be generated and saved")
    test = split(load_entries(cfg.data)[:cfg.limit or None], cfg.data)[2]
    started = time.time()
    responses = respond(model, test, tokenizer(), cfg.style)
    path = os.path.join(a.out, "instruction-data-with-response.json")
    write_text(path, json.dumps([{**e, "model_response": r} for e, r in zip(test, responses)], indent=2))
    log(f"{len(test)} test responses in {time.time() - started:.1f}s -> {path}")
    for e, r in list(zip(test, responses))[:3]:  # as the book shows them
        log(f"\n{e['instruction']}\n\nCorrect response:\n>> {e['output']}\n\nModel response:\n>> {r}\n{'-' * 40}")
    empty = sum(not r.strip() for r in responses)
    if empty:
        log(f"warning: {empty} of {len(responses)} responses are empty; they score 0")
    if judge_problem:
        raise ValueError(f"{judge_problem}; the responses are saved: score them later with python sft.py judge {path}")
    judge_file(path, a.judge, "model_response", a.url, a.timeout)


def log(msg):  # progress and notes go to stderr; answers to stdout
    print(msg, file=sys.stderr, flush=True)

def run_cli(fn, *args):
    """Run a command; a user error or Ctrl-C ends in one line on stderr and a non-zero exit, never a traceback."""
    try:
        fn(*args)
    except (ValueError, OSError) as e:
        sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message held
    except torch.OutOfMemoryError:
        sys.exit("error: out of memory: lower --batch-size (raise --grad-accum to keep the effective batch)")
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):  # the CPU allocator's out-of-memory
            raise
        sys.exit("error: out of memory: lower --batch-size (raise --grad-accum to keep the effective batch)")
    except KeyboardInterrupt:
        sys.exit("interrupted: the files written so far are whole; nothing half-written was left")

# ---------------------------------------------------------------- command line
def main(argv=None):
    ap = argparse.ArgumentParser(description="Instruction finetuning of GPT-2 (chapter 7 of Build a LLM From Scratch).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="finetune a model and write the run directory")
    for f in fields(TrainConfig):  # one flag per field: --batch-size fills batch_size
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        if f.type is bool:
            tr.add_argument(flag, action="store_true", help=text)
            continue
        if f.default is not None and "default" not in text:
            text += f" (default {f.default})"
        choices = list(STYLES) if f.name == "style" else None
        tr.add_argument(flag, type=f.type, default=f.default, choices=choices, help=text)
    ev = sub.add_parser("eval", help="answer the test split, then score the answers with an Ollama judge")
    ju = sub.add_parser("judge", help="score a responses file (the book's format) with an Ollama judge")
    ju.add_argument("file", help="JSON list of entries with the response under --key")
    ju.add_argument("--key", default="model_response", help="field holding the response")
    for p in (ev, ju):
        p.add_argument("--judge", default=judge.JUDGE, help="Ollama model that scores")
        p.add_argument("--url", help="Ollama server (default $OLLAMA_HOST, else http://localhost:11434)")
        p.add_argument("--timeout", type=float, default=judge.TIMEOUT, help="seconds for one whole reply")
    ge = sub.add_parser("generate", help="answer one instruction with a trained run (the answer alone on stdout)")
    ge.add_argument("instruction")
    ge.add_argument("--input", default="", help="optional input for the instruction")
    ge.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    for p in (ev, ge):
        p.add_argument("--out", default="runs/gpt2-medium", help="run directory written by train (default runs/gpt2-medium)")
        p.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        run_cli(lambda: train(TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})))
    else:
        commands = {"eval": eval_command, "generate": generate_command, "judge": judge_command}
        run_cli(commands[a.cmd], a)

if __name__ == "__main__":
    main()
