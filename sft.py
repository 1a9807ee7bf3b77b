"""Instruction finetuning of GPT-2: data -> prompts -> tokens -> batches -> training -> CLI."""
import argparse, copy, hashlib, json, math, os, shutil, sys, time
from dataclasses import asdict, dataclass, field, fields
import judge
try:  # torch takes seconds to import: Ctrl-C meanwhile is one line too
    import tiktoken
    import torch
    import torch.nn.functional as F
    import gpt
except KeyboardInterrupt:
    sys.exit("interrupted")
try:
    import fcntl  # advisory file locks (Linux, macOS)
except ImportError:  # Windows: one training per --out is then up to you
    fcntl = None

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "instruction-data.json")  # the book's 1,100 entries (Apache-2.0)
EOT = 50256      # <|endoftext|>: pads the batches, and is the one end target each row keeps
IGNORE = -100    # targets that cross_entropy skips
SPLIT = (0.85, 0.10)  # train and test fractions, as the book; validation gets the rest
STYLES = {  # (instruction, input when non-empty, response marker)
    "alpaca": ("Below is an instruction that describes a task. Write a response that "
               "appropriately completes the request.\n\n### Instruction:\n{instruction}",
               "\n\n### Input:\n{input}", "\n\n### Response:\n"),
    "phi3": ("<|user|>\n{instruction}", "\n{input}", "\n<|assistant|>\n"),
}

def log(message):  # progress and notes go to stderr; answers and scores to stdout
    print(message, file=sys.stderr, flush=True)

# ---------------------------------------------------------------- data
def read_json(path: str):
    """A JSON file; errors name the file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise ValueError(f"{path}: malformed JSON at {where}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{path}: the JSON is nested too deeply") from None

def read_entries(path: str) -> list:
    """A JSON list of {instruction, input (optional), output} strings; a bad entry is named."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, found a {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} is a {type(entry).__name__}, not an object")
        for key in ("instruction", "input", "output"):
            value = entry.get(key, "" if key == "input" else None)  # input is the only optional key
            if not isinstance(value, str):
                raise ValueError(f"{path}: entry {i}: {key!r} is missing or not a string")
    return data

def load_entries(source: str = DATA) -> list:
    """Entries from a path, or from a URL downloaded once into the cache (checked first)."""
    if source.startswith(("http://", "https://")):
        name = hashlib.sha1(source.encode()).hexdigest()[:16] + ".json"
        path = os.path.join(gpt.cache_dir("data"), name)
        if not os.path.exists(path):
            hint = "check the URL, or pass a local file with --data"
            gpt.download(source, path, read_entries, hint)
        source = path
    return read_entries(source)

def format_prompt(entry: dict, style: str = "alpaca") -> str:
    """The prompt up to the response marker: training appends the output, inference generates it."""
    head, extra, marker = STYLES[style]
    prompt = head.format(instruction=entry["instruction"])
    if entry.get("input"):
        prompt += extra.format(input=entry["input"])
    return prompt + marker

def split(entries: list, source: str = "data") -> tuple:
    """(train, val, test) in file order, with the book's arithmetic: 935 / 55 / 110 of 1,100."""
    n_train = int(SPLIT[0] * len(entries))
    n_test = int(SPLIT[1] * len(entries))
    train = entries[:n_train]
    test = entries[n_train:n_train + n_test]
    val = entries[n_train + n_test:]
    if not (train and val and test):
        raise ValueError(f"{source}: {len(entries)} entries are too few to split: at least 10")
    return train, val, test

def tokenizer():
    """tiktoken's gpt2 encoding, from the BPE files in data/ unless you set TIKTOKEN_CACHE_DIR."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "data", "tiktoken-cache"))
    try:
        return tiktoken.get_encoding("gpt2")  # it checks the files' hashes
    except Exception as e:  # a cache without the files: tiktoken downloads, and offline it fails
        cache = os.environ["TIKTOKEN_CACHE_DIR"]
        raise ValueError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}) from "
                         f"TIKTOKEN_CACHE_DIR={cache}; unset it to use the shipped files") from None

def tokenize(entries: list, enc, style: str = "alpaca") -> list:
    """[(ids, prompt_len)]: ids = enc(prompt) + enc(output); a written <|endoftext|> stays text."""
    prompts = enc.encode_ordinary_batch([format_prompt(e, style) for e in entries])
    outputs = enc.encode_ordinary_batch([e["output"] for e in entries])
    return [(p + o, len(p)) for p, o in zip(prompts, outputs)]

def collate(batch, pad_id=EOT, ignore_index=IGNORE, max_length=None, mask_prompt=False):
    """[(ids, prompt_len)] -> inputs, targets (B, T), T the longest row (at most max_length).
    The book's example, rows [0..4], [5, 6], [7, 8, 9] with E = 50256 and _ = -100, gives
    inputs  [[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]] and
    targets [[1, 2, 3, 4, E], [6, E, _, _, _], [8, 9, E, _, _]]. Masks go by position, not value."""
    T = max(len(ids) for ids, _ in batch)
    inputs = torch.full((len(batch), T), pad_id)
    targets = torch.full((len(batch), T), ignore_index)
    for i, (ids, prompt_len) in enumerate(batch):
        n = len(ids)
        inputs[i, :n] = torch.tensor(ids)
        targets[i, :n - 1] = inputs[i, 1:n]
        targets[i, n - 1] = pad_id  # the one end-of-text to emit, so the model learns to stop
        if mask_prompt:
            targets[i, :prompt_len - 1] = ignore_index  # no loss on predicting prompt tokens
    return inputs[:, :max_length], targets[:, :max_length]

# ---------------------------------------------------------------- loss and training
def opt(default, help):
    return field(default=default, metadata={"help": help})

@dataclass
class TrainConfig:
    model: str = opt("gpt2-medium", "gpt2[-medium|-large|-xl], owner/name, a local folder, or tiny "
                                    "(a random 7M-parameter GPT-2: no download)")
    data: str = opt(DATA, "a JSON list of entries: a path or URL (default: the book's, in data/)")
    out: str = opt(None, "the run folder (default: runs/<model name>)")
    style: str = opt("alpaca", "prompt style (exercise 7.1)")
    mask_prompt: bool = opt(False, "no loss on the prompt tokens (exercise 7.2)")
    epochs: int = opt(2, "passes over the training split")
    batch_size: int = opt(8, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step, token-weighted (exercise 7.3)")
    lr: float = opt(None, "AdamW learning rate (default: the book's 5e-5; 1e-3 for tiny)")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    max_length: int = opt(1024, "cut rows to this many tokens (and to the model's context)")
    lora_rank: int = opt(0, "LoRA: train rank-r adapters only (exercise 7.4; default 0: off)")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: updates are (alpha / rank) * B A")
    eval_every: int = opt(5, "optimizer steps between loss reports")
    limit: int = opt(0, "keep only the first N entries before the split (default 0: all)")
    seed: int = opt(123, "seed for the batch order and the tiny model")
    device: str = opt("auto", "auto (cuda if there is one, else cpu), cpu, cuda, cuda:1, mps")

    def __post_init__(self):
        if self.lr is None:
            self.lr = 1e-3 if self.model == "tiny" else 5e-5  # tiny starts from random weights
        if self.out is None:
            self.out = os.path.join("runs", os.path.basename(self.model.rstrip("/")))
        self.out = os.path.normpath(self.out)  # "runs/x/" is "runs/x": its lock and swap go beside
        for f in fields(self):  # argparse gives the right types; a hand-edited run.json may not
            value = getattr(self, f.name)
            kinds = (int, float) if f.type is float else (f.type,)
            if type(value) not in kinds:
                raise ValueError(f"{f.name} must be of type {f.type.__name__}, not {value!r}")
            flag = "--" + f.name.replace("_", "-")
            zero_is_off = f.name in ("weight_decay", "lora_rank", "lora_alpha", "limit")
            if f.type in (int, float) and not (0 < value < math.inf or (zero_is_off and value == 0)):
                lowest = ">= 0" if zero_is_off else "positive"
                raise ValueError(f"{flag} must be a {lowest} number, not {value}")
        if self.style not in STYLES:
            raise ValueError(f"--style {self.style}: not one of {', '.join(STYLES)}")
        for name in ("data", "model"):  # absolute, so eval and generate work from any folder
            if os.path.exists(getattr(self, name)):
                setattr(self, name, os.path.abspath(getattr(self, name)))

def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # fails unless this machine has it
    except (RuntimeError, AssertionError):
        raise ValueError(f"--device {name} is not available here; use auto or cpu") from None
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls where there is a GPU
    return device

def load_model(name: str, seed: int = 0) -> gpt.GPT:
    """tiny: a random small GPT-2 with the GPT-2 vocabulary; anything else: from_pretrained."""
    torch.manual_seed(seed)
    if name == "tiny":
        return gpt.GPT(gpt.GPTConfig(n_embd=128, n_layer=4, n_head=4))
    model = gpt.from_pretrained(name)
    vocab = model.config.vocab_size
    if vocab <= EOT:
        raise ValueError(f"model {name} has {vocab} tokens; the GPT-2 tokenizer needs {EOT + 1}")
    return model

def loss_sum(model, inputs, targets, device):
    """Cross-entropy summed over the targets that count (divide by their number for the mean)."""
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(inputs)  # (B, T, vocab)
    logits = logits.flatten(0, 1).float()  # (B*T, vocab)
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE, reduction="sum")

def loss_and_backward(model, micro_batches, device):
    """Gradients of the token-weighted mean loss over [(inputs, targets)]: as one batch of all."""
    count = sum(int((t != IGNORE).sum()) for _, t in micro_batches)  # on the CPU: no device sync
    count = max(count, 1)
    losses = []
    for inputs, targets in micro_batches:
        losses.append(loss_sum(model, inputs, targets, device))
        (losses[-1] / count).backward()  # each part over the whole count, not its own
    return sum(losses).detach(), count

def batches(rows, cfg):
    """[(inputs, targets)] of cfg.batch_size rows each, with the run's truncation and masking."""
    for i in range(0, len(rows), cfg.batch_size):
        part = rows[i:i + cfg.batch_size]
        yield collate(part, max_length=cfg.max_length, mask_prompt=cfg.mask_prompt)

@torch.no_grad()
def mean_loss(model, rows, cfg, device) -> float:
    """The mean loss over every target token of rows (not a mean of batch means)."""
    total = 0.0
    count = 0
    for inputs, targets in batches(rows, cfg):
        total += loss_sum(model, inputs, targets, device).item()
        count += int((targets != IGNORE).sum())
    return total / max(count, 1)

def prepare_rows(cfg, model, enc):
    """The train and validation rows, checked: each split keeps targets; a step has its rows."""
    train_e, val_e, test_e = split(load_entries(cfg.data)[:cfg.limit or None], cfg.data)
    cfg.max_length = min(cfg.max_length, model.config.n_positions)  # where the position table ends
    train_rows = tokenize(train_e, enc, cfg.style)
    val_rows = tokenize(val_e, enc, cfg.style)
    cut = sum(len(ids) > cfg.max_length for ids, _ in train_rows + val_rows)
    log(f"data: {len(train_e)} train / {len(val_e)} validation / {len(test_e)} test entries; "
        f"{cut} cut to --max-length {cfg.max_length}")
    for name, rows in (("training", train_rows), ("validation", val_rows)):
        # a row keeps a target when its first target column is inside the kept columns
        firsts = [prompt_len - 1 if cfg.mask_prompt else 0 for _, prompt_len in rows]
        if all(first >= min(len(ids), cfg.max_length) for first, (ids, _) in zip(firsts, rows)):
            raise ValueError(f"no {name} row keeps a response token within --max-length "
                             f"{cfg.max_length} (--mask-prompt masks prompts); raise --max-length")
    if len(train_rows) < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"--batch-size x --grad-accum is over the {len(train_rows)} training rows")
    return train_rows, val_rows, val_e

def report(model, rows, cfg, device, train_loss: float, **point) -> dict:
    """One point of the curves: the train loss given, the validation loss measured on rows."""
    val_loss = mean_loss(model, rows, cfg, device)
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):  # never NaN in metrics
        raise ValueError(f"training diverged (loss {train_loss}, step {point['step']}): lower --lr")
    return dict(**point, train_loss=train_loss, val_loss=val_loss)

def first_point(model, train_rows, val_rows, cfg, device) -> dict:
    """Step 0, before any update: the first batch's loss and the whole validation split's."""
    first_batch = mean_loss(model, train_rows[:cfg.batch_size], cfg, device)
    point = report(model, val_rows, cfg, device, first_batch, step=0, epoch=0, tokens=0, seconds=0)
    log(f"initial loss: train {first_batch:.3f}, validation {point['val_loss']:.3f}")
    return point

def optimizer_step(model, optimizer, batch, cfg, device) -> tuple:
    """One update from batch_size x grad_accum rows: (their summed loss, their target count)."""
    loss, count = loss_and_backward(model, list(batches(batch, cfg)), device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, count

def run_steps(model, optimizer, train_rows, val_rows, cfg, device, end_epoch):
    """Shuffled batches, the last partial one dropped (as the book); reports every eval_every."""
    rows_per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = len(train_rows) // rows_per_step
    steps = steps_per_epoch * cfg.epochs
    # the same validation rows at each report, as many as make one epoch's reports one pass
    subset = val_rows[:math.ceil(len(val_rows) / max(steps_per_epoch // cfg.eval_every, 1))]
    masked = "; losses cover the responses only" if cfg.mask_prompt else ""
    batch_text = f"{rows_per_step} ({cfg.batch_size} x {cfg.grad_accum})"
    log(f"training: lr {cfg.lr:g}, effective batch {batch_text}, {steps} steps; validation on "
        f"all {len(val_rows)} rows at start and end, the first {len(subset)} at each report{masked}")
    started = time.time()
    metrics = [first_point(model, train_rows, val_rows, cfg, device)]
    tail = time.time() - started  # the final full validation costs about this much again
    shuffle = torch.Generator().manual_seed(cfg.seed)
    running_loss = torch.zeros((), device=device)  # summed on the device: no sync per step
    running_count = 0
    tokens = 0
    started = time.time()
    for step in range(1, steps + 1):
        epoch = (step - 1) // steps_per_epoch + 1
        i = (step - 1) % steps_per_epoch  # the step within its epoch
        if i == 0:
            order = torch.randperm(len(train_rows), generator=shuffle).tolist()
        batch = [train_rows[j] for j in order[i * rows_per_step:(i + 1) * rows_per_step]]
        loss, count = optimizer_step(model, optimizer, batch, cfg, device)
        running_loss += loss
        running_count += count
        tokens += sum(min(len(ids), cfg.max_length) for ids, _ in batch)
        if step % cfg.eval_every == 0 or step == steps:
            rows = val_rows if step == steps else subset
            seconds = time.time() - started
            train_loss = running_loss.item() / running_count  # the mean since the last report
            metrics.append(report(model, rows, cfg, device, train_loss, step=step, epoch=epoch,
                                  tokens=tokens, seconds=round(seconds, 2)))
            running_loss.zero_()
            running_count = 0
            to_go = seconds / step * (steps - step) + tail
            val_loss = metrics[-1]["val_loss"]
            log(f"epoch {epoch} step {step}/{steps}: train {train_loss:.3f}, validation "
                f"{val_loss:.3f} ({len(rows)} rows), {tokens / seconds:,.0f} tokens/s, "
                f"{seconds:.0f}s elapsed, {to_go:.0f}s to go")
        if i == steps_per_epoch - 1:
            end_epoch(epoch, metrics, steps_per_epoch)
    return metrics

# ---------------------------------------------------------------- the loss plot
def _ticks(lo: float, hi: float) -> list:
    """Round numbers from lo to hi, 4 to 10 of them."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-9) / 4))
    while (hi - lo) / step > 10:
        step *= 2.5 if str(step)[0] == "2" else 2  # 1, 2, 5, 10, 20, 50, ...
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]

def _text(x: float, y: float, label, anchor="middle", color="black", extra="") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{color}"{extra}>{label}</text>'

def loss_svg(metrics, steps_per_epoch: int, w=720, h=420) -> str:
    """Train and validation (dashed) loss against steps; epochs marked, tokens seen on top."""
    left, right, top, bottom = 60, w - 20, 50, h - 50  # the plot area's edges, in pixels
    losses = [m[k] for m in metrics for k in ("train_loss", "val_loss")]
    margin = 0.05 * (max(losses) - min(losses)) + 1e-9
    lo = min(losses) - margin
    hi = max(losses) + margin
    last = max(metrics[-1]["step"], 1)

    def x(step):
        return left + step / last * (right - left)

    def y(loss):
        return bottom - (loss - lo) / (hi - lo) * (bottom - top)
    middle = (left + right) / 2
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<path d="M{left},{top} V{bottom} H{right}" stroke="black" fill="none"/>',
           _text(middle, h - 12, "optimizer step"),
           _text(middle, top - 26, "tokens seen", color="gray"),
           _text(14, h / 2, "loss", extra=f' transform="rotate(-90 14 {h / 2})"')]
    for loss in _ticks(lo, hi):
        svg.append(_text(left - 6, y(loss) + 4, f"{loss:g}", anchor="end"))
    for step in _ticks(0, last):
        tokens = min(metrics, key=lambda m: abs(m["step"] - step))["tokens"]  # the nearest report's
        svg.append(_text(x(step), bottom + 16, f"{step:g}"))
        svg.append(_text(x(step), top - 8, f"{tokens:,}", color="gray"))
    for epoch in range(1, last // steps_per_epoch + 1):
        at = x(epoch * steps_per_epoch)
        svg.append(f'<path d="M{at:.1f},{top} V{bottom}" stroke="gray" stroke-dasharray="2,4"/>')
        svg.append(_text(at - 4, bottom - 6, f"epoch {epoch}", anchor="end", color="gray"))
    lines = (("train_loss", "train", "#1f77b4", "none"), ("val_loss", "validation", "#f80", "6,4"))
    for row, (key, name, color, dash) in enumerate(lines):
        points = " ".join(f"{x(m['step']):.1f},{y(m[key]):.1f}" for m in metrics)
        style = f'stroke="{color}" stroke-width="2" fill="none" stroke-dasharray="{dash}"'
        svg.append(f'<polyline id="{name}" {style} points="{points}"/>')
        svg.append(f'<path d="M{right - 130},{top + 20 + 16 * row} h24" {style}/>')  # the legend
        svg.append(_text(right - 100, top + 24 + 16 * row, name, anchor="start"))
    return "\n".join(svg) + "\n</svg>\n"

# ---------------------------------------------------------------- the run folder
def beside(out: str, suffix: str) -> str:
    """A hidden sibling of the run folder: runs/.x.saving for runs/x."""
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{suffix}")

def restore(out: str):
    """Undo a save cut between its two renames (Ctrl-C, a kill): the previous run comes back."""
    if not os.path.exists(out) and os.path.exists(beside(out, "old")):
        os.rename(beside(out, "old"), out)

def claim_out(out: str):
    """Check that --out can be written, and lock it against a second training; returns the lock."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a run folder; pick another --out")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        lock = open(f"{out}.lock", "w")  # beside the folder, which save_run swaps
    except OSError as e:
        raise ValueError(f"cannot write the run folder {out} ({e.strerror}); pick another --out")
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go when the process ends
    except OSError:
        raise ValueError(f"another training is writing {out}; wait, or pick another --out")
    restore(out)
    return lock

def save_run(model, cfg, metrics: list, steps_per_epoch: int, epoch: int):
    """Write the whole run into a new folder, then swap it in: --out never mixes two runs' files."""
    staging = beside(cfg.out, "saving")
    old = beside(cfg.out, "old")
    for leftover in (staging, old):  # from a save that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    if cfg.lora_rank:  # a copy with the adapters folded in (a plain GPT-2); training goes on
        model = gpt.merge_lora(copy.deepcopy(model))
    gpt.save_pretrained(model, staging)
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    gpt.write_text(os.path.join(staging, "metrics.jsonl"), lines)
    gpt.write_text(os.path.join(staging, "loss.svg"), loss_svg(metrics, steps_per_epoch))
    settings = {**asdict(cfg), "epochs_done": epoch}
    gpt.write_text(os.path.join(staging, "run.json"), json.dumps(settings, indent=2))
    if os.path.exists(cfg.out):
        os.rename(cfg.out, old)  # the previous run goes as a whole, its responses and scores too
    os.rename(staging, cfg.out)
    shutil.rmtree(old, ignore_errors=True)

def what_was_kept(out: str) -> str:
    """After Ctrl-C: which epoch the run folder holds."""
    restore(out)
    if not os.path.exists(os.path.join(out, "run.json")):
        return "no epoch finished; nothing was saved"
    return f"{out} holds epoch {read_json(os.path.join(out, 'run.json'))['epochs_done']}"

def train(cfg: TrainConfig):
    lock = claim_out(cfg.out)  # first: an unwritable --out must not cost a training
    enc = tokenizer()
    device = pick_device(cfg.device)
    model = load_model(cfg.model, cfg.seed)
    train_rows, val_rows, val_e = prepare_rows(cfg, model, enc)
    if cfg.lora_rank:
        model = gpt.add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.model} on {device}, {trainable:,} trainable of {total:,} parameters")
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)

    def end_epoch(epoch, metrics, steps_per_epoch):
        answer = respond(model, val_e[:1], enc, cfg.style, 50)[0]  # as the book, after each epoch
        log(f"epoch {epoch} sample response to {val_e[0]['instruction']!r}: {answer!r}")
        save_run(model, cfg, metrics, steps_per_epoch, epoch)
    try:
        metrics = run_steps(model, optimizer, train_rows, val_rows, cfg, device, end_epoch)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(what_was_kept(cfg.out)) from None
    log(f"trained in {metrics[-1]['seconds']:.1f}s; validation loss {metrics[-1]['val_loss']:.3f}")
    lock.close()

# ---------------------------------------------------------------- responses and commands
def respond(model, entries, enc, style="alpaca", max_new_tokens=256, batch_size=32) -> list:
    """Each entry's greedy answer: the text of the new tokens only."""
    prompts = [enc.encode_ordinary(format_prompt(e, style)) for e in entries]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch well
    answers = [""] * len(prompts)
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        batch = [prompts[i] for i in chunk]
        for i, ids in zip(chunk, gpt.generate(model, batch, max_new_tokens, eos_id=EOT)):
            answers[i] = enc.decode(ids).strip()  # back in the entries' order
    return answers

def load_run(out: str, device: str):
    """The trained model and the settings of a run folder written by train."""
    restore(out)
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        raise ValueError(f"{out}: holds no trained run (no run.json); train one with --out {out}")
    settings = read_json(path)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not a JSON object of training settings")
    settings.pop("epochs_done", None)
    unknown = settings.keys() - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown setting {sorted(unknown)[0]!r}")
    try:
        cfg = TrainConfig(**settings)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return load_model(out).to(pick_device(device)), cfg

def generate_command(a):
    """generate: the answer alone on stdout, so it composes in pipes."""
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, not {a.max_new_tokens}")
    model, cfg = load_run(a.out, a.device)
    entry = {"instruction": a.instruction, "input": a.input}
    print(respond(model, [entry], tokenizer(), cfg.style, a.max_new_tokens)[0])

def judge_file(path: str, key: str, a):
    """Score every entry's response; X-scores.json beside X.json holds each entry with its score."""
    entries = read_entries(path)
    for i, e in enumerate(entries):
        if not isinstance(e.get(key), str):
            raise ValueError(f"{path}: entry {i} has no string {key!r}; pick the field with --key")
    asked = [e for e in entries if e[key].strip()]  # an empty response scores 0 without asking
    marker = STYLES["alpaca"][2]
    prompts = [format_prompt(e).removesuffix(marker) for e in asked]  # the book asks without it
    prompts = [judge.judge_prompt(p, e["output"], e[key]) for p, e in zip(prompts, asked)]
    stem = path.removesuffix(".json")
    scores = iter(judge.score_all(prompts, stem + "-scores.jsonl", a.judge, a.url, a.timeout))
    entries = [{**e, "score": next(scores) if e[key].strip() else 0} for e in entries]
    result = judge.summary([e["score"] for e in entries], a.judge)
    gpt.write_text(stem + "-scores.json", json.dumps({**result, "entries": entries}, indent=2))
    average = result["average"] or 0
    print(f"Average score: {average:.2f} ({result['scored']} of {result['total']} scored)")

def judge_command(a):
    judge_file(a.file, a.key, a)

def eval_command(a):
    """eval: the test split's responses, saved, then scored by the judge (checked first)."""
    model, cfg = load_run(a.out, a.device)
    judge_problem = None
    try:
        judge.preflight(a.judge, a.url)
    except ValueError as e:  # said now, not after the responses
        judge_problem = e
        log(f"warning: {e}; the responses will still be generated and saved")
    test = split(load_entries(cfg.data)[:cfg.limit or None], cfg.data)[2]
    started = time.time()
    responses = respond(model, test, tokenizer(), cfg.style)
    path = os.path.join(a.out, "instruction-data-with-response.json")
    answered = [{**e, "model_response": r} for e, r in zip(test, responses)]
    gpt.write_text(path, json.dumps(answered, indent=2))
    log(f"{len(test)} test responses in {time.time() - started:.1f}s -> {path}")
    for e in answered[:3]:  # as the book shows them
        log(f"\n{e['instruction']}\n\nCorrect response:\n>> {e['output']}\n\n"
            f"Model response:\n>> {e['model_response']}\n{'-' * 40}")
    empty = sum(not r.strip() for r in responses)
    if empty:
        log(f"warning: {empty} of {len(responses)} responses are empty; they score 0")
    later = f"the responses are saved: score them with python sft.py judge {path}"
    if judge_problem:
        raise ValueError(f"{judge_problem}; {later}")
    try:
        judge_file(path, "model_response", a)
    except ValueError as e:  # the scores so far are kept: the same command asks only the rest
        raise ValueError(f"{e}; {later}") from None

OUT_OF_MEMORY = "error: out of memory: lower --batch-size (raise --grad-accum to keep the batch)"

def run_cli(command, *args):
    """Run a command: a user error or Ctrl-C is one line on stderr and a non-zero exit."""
    try:
        command(*args)
    except (ValueError, OSError) as e:
        sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message held
    except (torch.OutOfMemoryError, MemoryError):  # a GPU's; the CPU allocator's is below
        sys.exit(OUT_OF_MEMORY)
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):
            raise
        sys.exit(OUT_OF_MEMORY)
    except KeyboardInterrupt as e:
        sys.exit(f"interrupted: {str(e) or 'the files written so far are whole'}")

# ---------------------------------------------------------------- command line
ENVIRONMENT = """environment:
  HF_ENDPOINT          hub mirror for --model downloads (default https://huggingface.co)
  XDG_CACHE_HOME       downloads go to $XDG_CACHE_HOME/gpt2-sft (default ~/.cache/gpt2-sft)
  TIKTOKEN_CACHE_DIR   tiktoken's BPE files (default: the copy in data/tiktoken-cache)
  OLLAMA_HOST          the judge's server (default http://localhost:11434)"""

def main(argv=None):
    layout = {"epilog": ENVIRONMENT, "formatter_class": argparse.RawTextHelpFormatter}
    about = "Instruction finetuning of GPT-2 (Build a Large Language Model From Scratch, ch. 7)."
    ap = argparse.ArgumentParser(description=about, **layout)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="finetune a model into a run folder", **layout)
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
    ev = sub.add_parser("eval", help="answer the test split, then score the answers with a judge")
    ju = sub.add_parser("judge", help="score a responses file (the book's format) with a judge")
    ju.add_argument("file", help="a JSON list of entries with the response under --key")
    ju.add_argument("--key", default="model_response", help="the field holding the response")
    for p in (ev, ju):
        p.add_argument("--judge", default=judge.JUDGE, help="the Ollama model that scores (llama3)")
        p.add_argument("--url", help="the Ollama server (default $OLLAMA_HOST or localhost:11434)")
        p.add_argument("--timeout", type=float, default=judge.TIMEOUT, help="seconds for one reply")
    ge = sub.add_parser("generate", help="answer one instruction with a trained run, on stdout")
    ge.add_argument("instruction", help="the instruction to answer")
    ge.add_argument("--input", default="", help="the instruction's input, if any")
    ge.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    for p in (ev, ge):
        p.add_argument("--out", default="runs/gpt2-medium", help="a run folder written by train")
        p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        settings = {f.name: getattr(a, f.name) for f in fields(TrainConfig)}
        run_cli(lambda: train(TrainConfig(**settings)))
        return
    commands = {"eval": eval_command, "generate": generate_command, "judge": judge_command}
    run_cli(commands[a.cmd], a)

if __name__ == "__main__":
    main()
