"""Instruction finetuning of GPT-2 (the book's chapter 7): the chapter first, the tool below it."""
import argparse, copy, hashlib, json, math, os, shutil, sys, time
from dataclasses import asdict, dataclass, field, fields
import gpt  # first: it quiets torch's warning about a missing numpy
import judge
import tiktoken
import torch
import torch.nn.functional as F

EOT = gpt.EOT    # <|endoftext|>: pads the batches, and is the one end target each row keeps
IGNORE = -100    # targets that cross_entropy skips
SPLIT = (0.85, 0.10)  # train and test fractions, as the book; validation gets the rest
STYLES = {  # (instruction, input when non-empty, response marker)
    "alpaca": ("Below is an instruction that describes a task. Write a response that "
               "appropriately completes the request.\n\n### Instruction:\n{instruction}",
               "\n\n### Input:\n{input}", "\n\n### Response:\n"),
    "phi3": ("<|user|>\n{instruction}", "\n{input}", "\n<|assistant|>\n")}

def log(message):  # progress and notes go to stderr; answers and scores to stdout
    print(message, file=sys.stderr, flush=True)

# ---------------- data: prompts, the split (7.2), tokens, batches (7.3)
def format_prompt(entry: dict, style: str = "alpaca") -> str:
    """The prompt up to and including the response marker (the book's format_input stops
    before it): training appends the output, inference generates it."""
    head, extra, marker = STYLES[style]
    prompt = head.format(instruction=entry["instruction"])
    if entry.get("input"):
        prompt += extra.format(input=entry["input"])
    return prompt + marker

def split(entries: list, source: str = "data") -> tuple:
    """(train, val, test) in file order, with the book's arithmetic: 935 / 55 / 110 of 1,100."""
    n_train = int(SPLIT[0] * len(entries))
    n_test = int(SPLIT[1] * len(entries))
    train_part = entries[:n_train]
    test_part = entries[n_train:n_train + n_test]
    val_part = entries[n_train + n_test:]
    if not (train_part and val_part and test_part):
        raise ValueError(f"{source}: {len(entries)} entries are too few to split: at least 10")
    return train_part, val_part, test_part

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
    # all -100 at first: the book's "every padding token but the first becomes -100" is done by
    # writing each row's real targets, and its one end-of-text, over them
    targets = torch.full((len(batch), T), ignore_index)
    for i, (ids, prompt_len) in enumerate(batch):
        n = len(ids)
        inputs[i, :n] = torch.tensor(ids)
        targets[i, :n - 1] = inputs[i, 1:n]  # position j predicts token j + 1
        targets[i, n - 1] = pad_id  # the one end-of-text to emit, so the model learns to stop
        if mask_prompt:  # targets 0 .. prompt_len - 2 are prompt tokens 1 .. prompt_len - 1;
            targets[i, :prompt_len - 1] = ignore_index  # the response's first token stays
    return inputs[:, :max_length], targets[:, :max_length]

# ---------------- the loss and the training loop (7.6)
def loss_sum(model, inputs, targets, device, bf16=False):
    """Cross-entropy summed over the targets that count: divided by their number, it is the
    book's calc_loss_batch (the mean over one batch)."""
    inputs = inputs.to(device)
    targets = targets.to(device)
    device_type = torch.device(device).type  # device: "cpu" (as the book) or a torch.device
    with torch.autocast(device_type, torch.bfloat16, enabled=bf16):  # the weights stay fp32
        logits = model(inputs)  # (B, T, vocab)
    logits = logits.flatten(0, 1).float()  # (B*T, vocab)
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE, reduction="sum")

def loss_and_backward(model, micro_batches, device, bf16=False):
    """Gradients of the token-weighted mean loss over [(inputs, targets)]: as one batch of all.
    With one micro-batch, the book's calc_loss_batch then loss.backward()."""
    count = sum(int((t != IGNORE).sum()) for _, t in micro_batches)  # on the CPU: no device sync
    count = max(count, 1)
    losses = []
    for inputs, targets in micro_batches:
        losses.append(loss_sum(model, inputs, targets, device, bf16))
        (losses[-1] / count).backward()  # each part over the whole count, not its own
    return sum(losses).detach(), count

def batches(rows, cfg):
    """[(inputs, targets)] of cfg.batch_size rows each, with the run's truncation and masking."""
    for i in range(0, len(rows), cfg.batch_size):
        part = rows[i:i + cfg.batch_size]
        yield collate(part, max_length=cfg.max_length, mask_prompt=cfg.mask_prompt)

@torch.no_grad()
def mean_loss(model, rows, cfg, device) -> float:
    """The book's calc_loss_loader, token-weighted: the mean over every target of rows."""
    model.eval()  # no training-only noise in what is measured
    total = 0.0
    count = 0
    for inputs, targets in batches(rows, cfg):
        total += loss_sum(model, inputs, targets, device, cfg.precision == "bf16").item()
        count += int((targets != IGNORE).sum())
    return total / max(count, 1)

def lr_factor(cfg, step: int, steps: int) -> float:
    """--lr's multiplier for step 1 .. steps: linear warmup from 0, then 1 or a cosine to 0."""
    s = step - 1  # as transformers: the first update uses f(0), so a warmup starts at 0
    if s < cfg.warmup_steps:
        return s / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (s - cfg.warmup_steps) / (steps - cfg.warmup_steps)))

def report(model, rows, cfg, device, train_loss: float, **point) -> dict:
    """One point of the curves, logged: the train loss given, the validation loss of rows."""
    val_loss = mean_loss(model, rows, cfg, device)
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):  # never NaN in metrics
        raise ValueError(f"training diverged (loss {train_loss}, step {point['step']}): lower --lr")
    log(f"epoch {point['epoch']} step {point['step']}: train {train_loss:.3f}, validation "
        f"{val_loss:.3f} ({len(rows)} rows), lr {point['lr']:.3g}, gradient norm "
        f"{point['grad_norm']:.3g}, {point['tokens']:,} tokens in {point['seconds']:.0f}s")
    return dict(**point, train_loss=train_loss, val_loss=val_loss)

def run_epochs(model, optimizer, train_rows, val_rows, cfg, device, steps_per_epoch: int):
    """The book's train_model_simple: shuffled batches, the last partial one dropped; yields
    (epoch, metrics) after each epoch. cfg is a TrainConfig (the tool's settings, below)."""
    rows_per_step = cfg.batch_size * cfg.grad_accum
    steps = steps_per_epoch * cfg.epochs
    # every report measures the same first k validation rows, k so that one epoch's reports cost
    # one pass over them all: k = 3 of the book's 55 (116 steps an epoch, a report every 5)
    subset = val_rows[:math.ceil(len(val_rows) / max(steps_per_epoch // cfg.eval_every, 1))]
    log(f"training: lr {cfg.lr:g}, effective batch {rows_per_step} ({cfg.batch_size} x "
        f"{cfg.grad_accum}), {steps} steps; validation on {len(subset)} rows at each report")
    first_batch = mean_loss(model, train_rows[:cfg.batch_size], cfg, device)
    start = dict(step=0, epoch=0, lr=0.0, grad_norm=0.0, tokens=0, seconds=0)  # before any update
    metrics = [report(model, val_rows, cfg, device, first_batch, **start)]
    shuffle = torch.Generator().manual_seed(cfg.seed)
    losses = []  # (summed loss, target count) of each step since the last report
    tokens = 0
    step = 0
    started = time.time()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(train_rows), generator=shuffle).tolist()
        for i in range(steps_per_epoch):
            step += 1
            batch = [train_rows[j] for j in order[i * rows_per_step:(i + 1) * rows_per_step]]
            model.train()  # this GPT-2 has no dropout: train mode only turns NEFTune's noise on
            micro_batches = list(batches(batch, cfg))
            losses.append(loss_and_backward(model, micro_batches, device, cfg.precision == "bf16"))
            lr = cfg.lr * lr_factor(cfg, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the global norm before clipping (with max_norm inf: measured, the gradients untouched)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += sum(min(len(ids), cfg.max_length) for ids, _ in batch)
            if step % cfg.eval_every == 0 or step == steps:
                # the train loss: these steps' own (the book's evaluate_model measures it again)
                train_loss = sum(loss for loss, _ in losses).item() / sum(n for _, n in losses)
                losses = []  # the sum above stays on the device until .item(): one sync a report
                rows = val_rows if step == steps else subset  # all of them at the end
                seconds = round(time.time() - started, 2)
                metrics.append(report(model, rows, cfg, device, train_loss, step=step, epoch=epoch,
                                      lr=lr, grad_norm=norm.item(), tokens=tokens, seconds=seconds))
        yield epoch, metrics

# ---------------- answers (7.7)
def respond(model, entries, enc, style="alpaca", max_new_tokens=256, progress=False) -> list:
    """Each entry's greedy answer (its new tokens as text), 32 prompts of like length at a time."""
    model.eval()
    prompts = [enc.encode_ordinary(format_prompt(e, style)) for e in entries]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for k in range(0, len(order), 32):
        chunk = order[k:k + 32]
        new_ids = gpt.generate(model, [prompts[i] for i in chunk], max_new_tokens, eos_id=EOT)
        for i, ids in zip(chunk, new_ids):
            answers[i] = enc.decode(ids).strip()  # back in the entries' order
        if progress:  # minutes for gpt2-medium on a CPU
            log(f"answered {k + len(chunk)} of {len(prompts)}")
    return answers

# ================ the tool: what runs the job for real and fails well, none of it the chapter
DATA = os.path.join(gpt.HERE, "data", "instruction-data.json")  # the book's 1,100 entries (Apache-2.0)

def flag(default, help):
    return field(default=default, metadata={"help": help})

@dataclass
class TrainConfig:
    model: str = flag("gpt2-medium", "gpt2[-medium|-large|-xl], owner/name, a folder, or tiny (random)")
    data: str = flag(DATA, "a JSON list of entries: a path or URL (default: the book's)")
    out: str = flag(None, "the run folder (default: runs/<model name>)")
    style: str = flag("alpaca", "prompt style (exercise 7.1)")
    mask_prompt: bool = flag(False, "no loss on the prompt tokens (exercise 7.2)")
    epochs: int = flag(2, "passes over the training split")
    batch_size: int = flag(8, "rows per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step, token-weighted (exercise 7.3)")
    lr: float = flag(None, "AdamW learning rate (default: the book's 5e-5; 1e-3 for tiny)")
    weight_decay: float = flag(0.1, "AdamW weight decay")
    warmup_steps: int = flag(0, "optimizer steps of linear warmup from 0 to --lr")
    schedule: str = flag("constant", "the learning rate after warmup: constant or cosine (to 0)")
    max_grad_norm: float = flag(0.0, "clip the gradients' global norm to this (default 0: off)")
    max_length: int = flag(1024, "cut rows to this many tokens (and to the model's context)")
    lora_rank: int = flag(0, "LoRA: train rank-r adapters only (exercise 7.4; default 0: off)")
    lora_alpha: float = flag(16.0, "LoRA scale numerator: updates are (alpha / rank) * B A")
    neftune_alpha: float = flag(0.0, "NEFTune: embedding noise alpha / sqrt(L * d) (0: off)")
    eval_every: int = flag(5, "optimizer steps between loss reports")
    limit: int = flag(0, "keep only the first N entries before the split (default 0: all)")
    seed: int = flag(123, "seed for the batch order and the tiny model")
    device: str = flag("auto", "auto (cuda, then mps, then cpu), or one: cpu, cuda, cuda:1, mps")
    precision: str = flag("auto", "bf16 or fp32 (default auto: bf16 where the device has it)")

    def __post_init__(self):
        if self.lr is None:
            self.lr = 1e-3 if self.model == "tiny" else 5e-5  # tiny starts from random weights
        if self.out is None:
            self.out = os.path.join("runs", os.path.basename(self.model.rstrip("/")))
        for f in fields(self):  # numbers must be positive; those that switch something off may be 0
            value = getattr(self, f.name)
            may_be_zero = f.default == 0 or f.name == "weight_decay"
            if f.type in (int, float) and not (0 < value < math.inf or (may_be_zero and value == 0)):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a positive number, not {value}")
        choices = {"style": STYLES, "schedule": ("constant", "cosine"),
                   "precision": ("auto", "bf16", "fp32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)}: not one of {', '.join(allowed)}")
        if os.path.exists(self.data):  # absolute, so eval works from any folder
            self.data = os.path.abspath(self.data)

# ---------------- data files
def read_entries(path: str) -> list:
    """A JSON list of {instruction, input (optional), output} strings; a bad entry is named."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{path}: cannot read JSON ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, found a {type(data).__name__}")
    for i, entry in enumerate(data):
        for key in ("instruction", "input", "output"):
            default = "" if key == "input" else None  # input is the only optional key
            if not isinstance(entry, dict) or not isinstance(entry.get(key, default), str):
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

def tokenizer():
    """tiktoken's gpt2 encoding, from the BPE files in data/ unless TIKTOKEN_CACHE_DIR is set."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", gpt.TIKTOKEN_CACHE)
    return tiktoken.get_encoding("gpt2")  # it checks the files' hashes

# ---------------- devices and the model
def pick_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu. torch 2.13's MPS matmul gives M1/M2 wrong gradients when it
    sums over 32,767 terms, as the tied head's backward does (pytorch#183535)."""
    mps_right = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 14)
    if name == "auto":
        name = "cpu"
        if torch.backends.mps.is_available() and mps_right:
            name = "mps"
        if torch.cuda.is_available():
            name = "cuda"
    if name.startswith("mps") and not mps_right:
        raise ValueError(f"--device mps needs torch 2.14 or newer, not {torch.__version__} (its "
                         "gradients are wrong on M1/M2): pip install -U 'torch>=2.14'")
    try:
        torch.empty(0, device=name)  # fails unless this machine has it
    except (RuntimeError, AssertionError):
        raise ValueError(f"--device {name} is not available here; use auto or cpu") from None
    return torch.device(name)

def native_bf16(device: torch.device) -> bool:
    """Does the device compute in bf16 natively? Emulated bf16 is slower than fp32."""
    if device.type == "cuda":  # Ampere (8.0) on; a T4 is 7.5
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":  # AVX512-BF16 or AMX (Zen 4, Sapphire Rapids on)
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False  # mps trains in fp32

def load_model(name: str, seed: int = 0) -> gpt.GPT:
    """tiny: a random small GPT-2 with the GPT-2 vocabulary; anything else: from_pretrained."""
    torch.manual_seed(seed)
    if name == "tiny":
        return gpt.GPT(gpt.GPTConfig(n_embd=128, n_layer=4, n_head=4))
    return gpt.from_pretrained(name)

def has_target(row, cfg) -> bool:
    """Does the row keep a target to learn once cut and masked?"""
    targets = collate([row], max_length=cfg.max_length, mask_prompt=cfg.mask_prompt)[1]
    return bool((targets != IGNORE).any())

def prepare_rows(cfg, model, enc):
    """The tokenized train and validation rows, and the validation entries."""
    train_e, val_e, test_e = split(load_entries(cfg.data)[:cfg.limit or None], cfg.data)
    cfg.max_length = min(cfg.max_length, model.config.n_positions)  # where the position table ends
    train_rows = tokenize(train_e, enc, cfg.style)
    val_rows = tokenize(val_e, enc, cfg.style)
    cut = sum(len(ids) > cfg.max_length for ids, _ in train_rows + val_rows)
    log(f"data: {len(train_e)} train / {len(val_e)} validation / {len(test_e)} test entries; "
        f"{cut} cut to --max-length {cfg.max_length}")
    for name, rows in (("training", train_rows), ("validation", val_rows)):
        masked = sum(not has_target(row, cfg) for row in rows)
        if masked == len(rows):  # a loss over no token: nothing to learn or measure
            raise ValueError(f"no {name} row keeps a target after --max-length {cfg.max_length} "
                             "with --mask-prompt: raise --max-length, or train without --mask-prompt")
        if masked:
            log(f"{masked} of {len(rows)} {name} rows keep no target (--max-length cuts off their response)")
    if len(train_rows) < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"--batch-size x --grad-accum is over the {len(train_rows)} training rows")
    return train_rows, val_rows, val_e

# ---------------- the loss plot
def _text(x: float, y: float, label, anchor="middle", more="") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{more}>{label}</text>'

def loss_svg(metrics: list, steps_per_epoch: int) -> str:
    """Train (solid) and validation (dashed) loss against optimizer steps, epochs marked."""
    losses = [m[k] for m in metrics for k in ("train_loss", "val_loss")]
    low = min(losses)
    span = max(max(losses) - low, 1e-9)
    last = max(metrics[-1]["step"], 1)
    def x(step):  # the plot area is x 60 to 620, y 20 (the highest loss) to 350 (the lowest)
        return 60 + 560 * step / last
    def y(loss):
        return 350 - 330 * (loss - low) / span
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="400" font-size="12">',
           '<rect width="640" height="400" fill="white"/>',
           '<path d="M60,20 V350 H620" stroke="black" fill="none"/>',
           _text(340, 390, "optimizer step"),
           _text(20, 185, "loss", more=' transform="rotate(-90 20 185)"')]
    for k in range(5):  # five evenly spaced ticks on each axis
        step = round(last * k / 4)
        loss = low + span * k / 4
        svg.append(_text(x(step), 368, step))
        svg.append(_text(54, y(loss) + 4, f"{loss:.2f}", "end"))
    for epoch in range(1, last // steps_per_epoch + 1):
        at = x(epoch * steps_per_epoch)
        svg.append(f'<path d="M{at:.1f},20 V350" stroke="gray" stroke-dasharray="2,4"/>')
        svg.append(_text(at - 4, 344, f"epoch {epoch}", "end", ' fill="gray"'))
    curves = (("train_loss", "train", "#1f77b4", "none"), ("val_loss", "validation", "#f80", "6,4"))
    for row, (key, name, color, dash) in enumerate(curves):
        style = f'stroke="{color}" stroke-width="2" fill="none" stroke-dasharray="{dash}"'
        points = " ".join(f"{x(m['step']):.1f},{y(m[key]):.1f}" for m in metrics)
        svg.append(f'<polyline id="{name}" {style} points="{points}"/>')
        svg.append(f'<path d="M490,{34 + 16 * row} h24" {style}/>')  # the legend
        svg.append(_text(520, 38 + 16 * row, name, "start"))
    return "\n".join(svg) + "\n</svg>\n"

# ---------------- the run folder
RESPONSES = "instruction-data-with-response"  # eval's file; the judge's files begin the same
RUN_FILES = ("model.safetensors", "config.json", *gpt.TOKENIZER_FILES, "metrics.jsonl", "loss.svg",
             "run.json")

def claim_out(out: str):
    """Before the model loads: --out must be writable; its old answers and scores go."""
    try:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name.startswith(RESPONSES):  # they belong to other weights
                os.remove(os.path.join(out, name))
    except OSError as e:
        raise ValueError(f"cannot write the run folder {out} ({e.strerror}); pick another --out")
    if not os.access(out, os.W_OK):
        raise ValueError(f"cannot write the run folder {out}; pick another --out")

def held_before(out: str) -> str:
    """What --out holds until this run's first save: the earlier run's epoch, or nothing."""
    try:
        with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
            epoch = json.load(f)["epochs_done"]
    except (OSError, ValueError, TypeError, KeyError):  # no run.json, or not one train wrote
        return "no epoch finished; nothing was saved"
    return f"no epoch of this run finished; {out} still holds the earlier run's epoch {epoch}"

def save_run(model, cfg, metrics: list, steps_per_epoch: int, epoch: int):
    """Every file under a temp name first, then the renames, run.json last: no two runs mixed."""
    staging = os.path.join(cfg.out, ".saving")
    if cfg.lora_rank:  # a copy with the adapters folded in (a plain GPT-2); training goes on
        model = gpt.merge_lora(copy.deepcopy(model))
    try:
        gpt.save_pretrained(model, staging)
        metrics_lines = "".join(json.dumps(m) + "\n" for m in metrics)
        gpt.write_text(os.path.join(staging, "metrics.jsonl"), metrics_lines)
        gpt.write_text(os.path.join(staging, "loss.svg"), loss_svg(metrics, steps_per_epoch))
        settings = json.dumps({**asdict(cfg), "epochs_done": epoch}, indent=2)
        gpt.write_text(os.path.join(staging, "run.json"), settings)
        for name in RUN_FILES:
            os.replace(os.path.join(staging, name), os.path.join(cfg.out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

def train(cfg: TrainConfig):
    claim_out(cfg.out)  # first: an unwritable --out must not cost a training
    enc = tokenizer()
    device = pick_device(cfg.device)
    if cfg.precision == "auto":  # run.json keeps what it trained in
        cfg.precision = "bf16" if native_bf16(device) else "fp32"
    model = load_model(cfg.model, cfg.seed)
    train_rows, val_rows, val_e = prepare_rows(cfg, model, enc)
    if cfg.lora_rank:
        model = gpt.add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if cfg.neftune_alpha:
        gpt.add_neftune(model, cfg.neftune_alpha)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.model} on {device} in {cfg.precision}, {trainable:,} trainable of {total:,}"
        " parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps_per_epoch = len(train_rows) // (cfg.batch_size * cfg.grad_accum)
    kept = held_before(cfg.out)
    try:
        for epoch, metrics in run_epochs(model, optimizer, train_rows, val_rows, cfg, device,
                                         steps_per_epoch):
            answer = respond(model, val_e[:1], enc, cfg.style, 50)[0]  # as the book, each epoch
            log(f"epoch {epoch} sample response to {val_e[0]['instruction']!r}: {answer!r}")
            save_run(model, cfg, metrics, steps_per_epoch, epoch)
            kept = f"{cfg.out} holds epoch {epoch}"
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept) from None
    log(f"trained in {metrics[-1]['seconds']:.1f}s; validation loss {metrics[-1]['val_loss']:.3f}")

# ---------------- the commands and the command line
def load_run(out: str, device: str):
    """The trained model and the settings of a run folder written by train."""
    try:  # no run there, or a hand-edited run.json: one line, whatever is wrong
        with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
            settings = json.load(f)
        settings.pop("epochs_done", None)
        cfg = TrainConfig(**settings)
        model = load_model(out)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{out}: holds no run that train wrote ({e}); train one there") from None
    return model.to(pick_device(device)), cfg

def generate_command(a):
    """generate: answers alone on stdout; no instruction: one per line of stdin, as each comes."""
    model, cfg = load_run(a.out, a.device)  # once, however many instructions follow
    enc = tokenizer()
    chat = a.instruction is None
    if chat and sys.stdin.isatty():  # a prompt on a terminal; in a pipe, nothing but the answers
        log("instructions, one per line (Ctrl-D ends):")
    for line in sys.stdin if chat else [a.instruction]:
        entry = {"instruction": line.rstrip("\n"), "input": a.input}
        answer = respond(model, [entry], enc, cfg.style, a.max_new_tokens)[0]
        if chat:  # one line per answer: its own line breaks are written as \n
            answer = answer.replace("\n", "\\n")
        print(answer, flush=True)

def judge_file(path: str, key: str, a):
    """Score every entry's response; X-scores.json beside X.json holds each entry with its score."""
    entries = read_entries(path)
    for i, e in enumerate(entries):
        if not isinstance(e.get(key), str):
            raise ValueError(f"{path}: entry {i} has no string {key!r}; pick the field with --key")
    marker = STYLES["alpaca"][2]
    prompts = [format_prompt(e).removesuffix(marker) for e in entries]  # the book asks without it
    prompts = [judge.judge_prompt(p, e["output"], e[key]) for p, e in zip(prompts, entries)]
    stem = path.removesuffix(".json")
    scores = judge.score_all(prompts, stem + "-scores.jsonl", a.judge, a.url, a.timeout)
    entries = [{**e, "score": score} for e, score in zip(entries, scores)]
    scored = [e["score"] for e in entries if e["score"] is not None]  # None: no score in the reply
    average = sum(scored) / len(scored) if scored else None  # None: nothing to average
    result = {"judge": a.judge, "average": average, "scored": len(scored), "total": len(entries)}
    gpt.write_text(stem + "-scores.json", json.dumps({**result, "entries": entries}, indent=2))
    print(f"Average score: {average or 0:.2f} ({len(scored)} of {len(entries)} scored)")

def eval_command(a):
    """eval: the test split's responses, saved, then scored by the judge (checked first)."""
    model, cfg = load_run(a.out, a.device)
    try:
        judge.preflight(a.judge, a.url)
    except ValueError as e:  # said now, not after minutes of answering
        log(f"warning: {e}; the responses will still be generated and saved")
    test = split(load_entries(cfg.data)[:cfg.limit or None], cfg.data)[2]
    responses = respond(model, test, tokenizer(), cfg.style, progress=True)
    path = os.path.join(a.out, RESPONSES + ".json")
    answered = [{**e, "model_response": r} for e, r in zip(test, responses)]
    gpt.write_text(path, json.dumps(answered, indent=2))
    for e in answered[:3]:  # as the book shows them
        log(f"\n{e['instruction']}\n\nCorrect response:\n>> {e['output']}\n\n"
            f"Model response:\n>> {e['model_response']}\n{'-' * 40}")
    empty = sum(not r.strip() for r in responses)
    log(f"{len(test)} test responses -> {path}; {empty} of them empty")
    later = f"the responses are saved: score them with python sft.py judge {path}"
    try:
        judge_file(path, "model_response", a)
    except (ValueError, OSError) as e:  # the scores so far are kept: the same command asks the rest
        raise ValueError(f"{e}; {later}") from None

def run_cli(command, *args):
    """Run a command: a user error or Ctrl-C is one line on stderr and a non-zero exit."""
    try:
        command(*args)
    except (ValueError, OSError) as e:
        sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message held
    except RuntimeError as e:  # CUDA's OutOfMemoryError; MPS says it in a plain RuntimeError
        if "out of memory" not in str(e):
            raise
        sys.exit("error: out of memory: lower --batch-size (raise --grad-accum to keep the batch)")
    except KeyboardInterrupt as e:
        sys.exit(f"interrupted: {str(e) or 'the files written so far are whole'}")

def main(argv=None):
    ap = argparse.ArgumentParser(description="Instruction finetuning of GPT-2. See README.md.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="finetune a model into a run folder")
    for f in fields(TrainConfig):  # one flag per field: --batch-size fills batch_size
        text = f.metadata["help"]
        if f.default is not None and "default" not in text:
            text += f" (default {f.default})"
        kind = {"action": "store_true"} if f.type is bool else {"type": f.type}
        tr.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=text, **kind)
    ev = sub.add_parser("eval", help="answer the test split, then score the answers with a judge")
    ju = sub.add_parser("judge", help="score a responses file (the book's format) with a judge")
    ju.add_argument("file", help="a JSON list of entries with the response under --key")
    ju.add_argument("--key", default="model_response", help="the field holding the response")
    for p in (ev, ju):
        p.add_argument("--judge", default=judge.JUDGE, help="the Ollama model that scores (llama3)")
        p.add_argument("--url", help="the Ollama server (default $OLLAMA_HOST or localhost:11434)")
        p.add_argument("--timeout", type=float, default=judge.TIMEOUT, help="seconds for one reply")
    ge = sub.add_parser("generate", help="answer instructions with a trained run, on stdout")
    ge.add_argument("instruction", nargs="?", help="the instruction (none: one per line of stdin)")
    ge.add_argument("--input", default="", help="the instruction's input, if any")
    ge.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    for p in (ev, ge):
        p.add_argument("--out", default="runs/gpt2-medium", help="a run folder written by train")
        p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        settings = {f.name: getattr(a, f.name) for f in fields(TrainConfig)}
        run_cli(lambda: train(TrainConfig(**settings)))
        return
    commands = {"eval": eval_command, "generate": generate_command,
                "judge": lambda a: judge_file(a.file, a.key, a)}
    run_cli(commands[a.cmd], a)

if __name__ == "__main__":
    main()
