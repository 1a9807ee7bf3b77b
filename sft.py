"""Instruction finetuning of GPT-2: data -> prompts -> tokens -> batches -> training -> responses, and the CLI."""
import argparse, hashlib, json, os, sys, time, urllib.parse
from dataclasses import asdict, dataclass, field, fields

import judge
from gpt import GPT, GPTConfig, add_lora, cache_dir, download, from_pretrained, generate, merge_lora
from gpt import save_pretrained, write_text
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
import tiktoken

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
    out: str = opt("", "run directory (default runs/<model name>)")
    style: str = opt("alpaca", "prompt style: " + " or ".join(STYLES) + " (exercise 7.1)")
    mask_prompt: bool = opt(False, "no loss on the prompt tokens (exercise 7.2)")
    epochs: int = opt(2, "passes over the training split")
    batch_size: int = opt(8, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step, token-weighted (exercise 7.3)")
    lr: float = opt(0.0, "AdamW learning rate (default: the book's 5e-5; 1e-3 for tiny, which starts from random weights)")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    max_length: int = opt(1024, "truncate rows to this many tokens")
    lora_rank: int = opt(0, "train low-rank adapters of this rank instead of all weights (exercise 7.4; 0: off)")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: updates are (alpha / rank) * B A")
    eval_every: int = opt(5, "optimizer steps between loss reports")
    limit: int = opt(0, "keep only the first N entries before the split (0: all)")
    seed: int = opt(123, "seed for the shuffling and the tiny model")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, mps")
    compile: bool = opt(False, "torch.compile the model for the training steps (faster on a GPU, after a warm-up)")

    def __post_init__(self):
        self.lr = self.lr or (1e-3 if self.model == "tiny" else 5e-5)
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "eval_every", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if min(self.weight_decay, self.limit, self.lora_rank) < 0 or self.style not in STYLES:
            raise ValueError(f"--weight-decay, --limit and --lora-rank cannot be negative; --style is one of {', '.join(STYLES)}")
        self.out = self.out or os.path.join("runs", os.path.basename(self.model.rstrip("/")))
        self.data, self.model = (os.path.abspath(p) if os.path.exists(p) else p for p in (self.data, self.model))  # eval runs anywhere

def pick_device(name: str) -> torch.device:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls where there is a GPU
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if (name := auto if name == "auto" else name).split(":")[0] not in (auto, "cpu"):
        raise ValueError(f"--device {name} is not available here; use auto (which picks {auto}) or cpu")
    return torch.device(name)

def load_model(name: str, seed: int = 0) -> GPT:
    """tiny: a random small GPT-2 with the GPT-2 vocabulary (7M parameters); anything else: from_pretrained."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_embd=128, n_layer=4, n_head=4)) if name == "tiny" else from_pretrained(name)
    if model.config.vocab_size < EOT + 1:
        raise ValueError(f"model {name} has {model.config.vocab_size} tokens; the GPT-2 tokenizer needs {EOT + 1}")
    return model

def loss_sum(model, inputs, targets, device):
    """Cross-entropy summed over the non-ignored targets (divide by their count for the token-weighted mean)."""
    inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")

def backward(model, micro, device):
    """Gradients of the token-weighted mean loss over micro-batches [(inputs, targets)]: the same as one batch of all."""
    total, losses = max(sum(int((t != IGNORE).sum()) for _, t in micro), 1), []  # counted on the CPU: no device sync
    for x, y in micro:
        losses.append(loss_sum(model, x, y, device))
        (losses[-1] / total).backward()
    return sum(losses).detach(), total

@torch.no_grad()
def mean_loss(model, rows, cfg, device) -> float:
    batches = [collate(rows[i:i + cfg.batch_size], max_length=cfg.max_length, mask_prompt=cfg.mask_prompt) for i in range(0, len(rows), cfg.batch_size)]
    count = max(sum(int((y != IGNORE).sum()) for _, y in batches), 1)
    return sum(loss_sum(model, x, y, device).item() for x, y in batches) / count

def train(cfg: TrainConfig):
    train_e, val_e, test_e = split(load_entries(cfg.data)[:cfg.limit or None], cfg.data)
    enc, device = tokenizer(), pick_device(cfg.device)
    model = load_model(cfg.model, cfg.seed).to(device)
    cfg.max_length = min(cfg.max_length, model.config.n_positions)
    train_rows, val_rows = tokenize(train_e, enc, cfg.style), tokenize(val_e, enc, cfg.style)
    rows_per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = len(train_rows) // rows_per_step  # shuffled, the last partial batch dropped (as the book)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size x --grad-accum = {rows_per_step} is more than the {len(train_rows)} training entries")
    cut = sum(len(ids) > cfg.max_length for ids, _ in train_rows + val_rows)
    log(f"data: {len(train_e)} train / {len(val_e)} validation / {len(test_e)} test entries; {cut} cut to --max-length {cfg.max_length}")
    model = add_lora(model, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else model
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"model: {cfg.model} on {device}, {sum(p.numel() for p in params):,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))
    steps, g, compiled = steps_per_epoch * cfg.epochs, torch.Generator().manual_seed(cfg.seed), torch.compile(model) if cfg.compile else model
    window = -(-len(val_rows) * cfg.eval_every // steps_per_epoch)  # validation rows per report, rounded up
    metrics = [dict(step=0, epoch=0, tokens=0, train_loss=mean_loss(model, train_rows[:cfg.batch_size], cfg, device),
                    val_loss=mean_loss(model, val_rows, cfg, device), seconds=0.0)]
    log(f"initial loss: train {metrics[0]['train_loss']:.3f}, validation {metrics[0]['val_loss']:.3f}")
    run_loss, run_n, tokens, t0 = torch.zeros((), device=device), 0, 0, time.time()
    for step in range(1, steps + 1):
        epoch, i = divmod(step - 1, steps_per_epoch)
        if i == 0:
            order = torch.randperm(len(train_rows), generator=g).tolist()
        batch = [train_rows[j] for j in order[i * rows_per_step:(i + 1) * rows_per_step]]
        loss, n = backward(compiled, [collate(batch[k:k + cfg.batch_size], max_length=cfg.max_length, mask_prompt=cfg.mask_prompt)
                                        for k in range(0, rows_per_step, cfg.batch_size)], device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run_loss, run_n = run_loss + loss, run_n + n  # summed on the device: no sync per step
        tokens += sum(min(len(ids), cfg.max_length) for ids, _ in batch)
        if step % cfg.eval_every == 0 or step == steps:
            # train loss: the steps since the last report; validation: the next `window` rows (all of them at the end)
            k = (step // cfg.eval_every * window) % len(val_rows)
            secs = time.time() - t0
            metrics.append(dict(step=step, epoch=epoch + 1, tokens=tokens, train_loss=run_loss.item() / max(run_n, 1), seconds=round(secs, 2),
                                val_loss=mean_loss(model, val_rows if step == steps else (val_rows[k:] + val_rows[:k])[:window], cfg, device)))
            run_loss, run_n = run_loss * 0, 0
            log(f"epoch {epoch + 1} step {step}/{steps}: train {metrics[-1]['train_loss']:.3f}, validation {metrics[-1]['val_loss']:.3f}, "
                f"{tokens / secs:,.0f} tokens/s, {secs:.0f}s elapsed, {secs * (steps - step) / step:.0f}s to go")
        if i == steps_per_epoch - 1:
            log(f"epoch {epoch + 1} sample response to {val_e[0]['instruction']!r}: {respond(model, val_e[:1], enc, cfg.style, 50)[0]!r}")
    log(f"trained {steps} steps in {time.time() - t0:.1f}s; validation loss {metrics[-1]['val_loss']:.3f}")
    save_pretrained(merge_lora(model), cfg.out)  # adapters folded in: the run is a plain GPT-2 checkpoint
    write_text(os.path.join(cfg.out, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics))
    write_text(os.path.join(cfg.out, "loss.svg"), loss_svg(metrics))
    write_text(os.path.join(cfg.out, RUN_FILE), json.dumps(asdict(cfg), indent=2))

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
    try:
        with open(os.path.join(out, RUN_FILE)) as f:
            cfg = TrainConfig(**json.load(f))
    except (OSError, ValueError, TypeError):
        raise ValueError(f"{out}: holds no trained run (no readable {RUN_FILE}); train one with python sft.py train --out {out}") from None
    return load_model(out).to(pick_device(device)), cfg

def generate_command(a):
    """generate: the response alone on stdout, so it composes in pipes."""
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
    except KeyboardInterrupt:
        sys.exit("interrupted: the files written so far are whole; nothing half-written was left")

# ---------------------------------------------------------------- command line
def main(argv=None):
    ap = argparse.ArgumentParser(description="Instruction finetuning of GPT-2 (chapter 7 of Build a LLM From Scratch).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="finetune a model and write the run directory")
    for f in fields(TrainConfig):  # one flag per field: --batch-size fills batch_size
        kind = {"action": "store_true"} if f.default is False else {"type": type(f.default), "default": f.default}
        tr.add_argument("--" + f.name.replace("_", "-"), **kind, help=f.metadata["help"] + f" (default {f.default!r})")
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
    ge.add_argument("--max-new-tokens", type=int, default=256)
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
