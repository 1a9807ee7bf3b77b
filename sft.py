"""Instruction finetuning of GPT-2: the book's chapter 7 first, the tool below the divider."""
from gpt import generate  # first: gpt quiets a numpy warning
import torch
from torch.utils.data import Dataset

# ---------------- data: prompts and the split (7.2), the dataset and its batches (7.3)
def format_input(entry):
    """The book's Alpaca prompt: the instruction, then the input if any (no response marker)."""
    instruction_text = ("Below is an instruction that describes a task. Write a response that "
                        "appropriately completes the request."
                        f"\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text

def format_input_phi(entry):
    """Exercise 7.1: the Phi-3 prompt; its marker is <|assistant|>: on a line of its own."""
    input_text = f"\n{entry['input']}" if entry.get("input") else ""
    return f"<|user|>\n{entry['instruction']}" + input_text

def split(data) -> tuple:
    """The book's three sets in the order it makes them: train_data, test_data, val_data
    (935 / 110 / 55 of 1,100 entries)."""
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    return train_data, test_data, val_data

class InstructionDataset(Dataset):
    """The book's dataset: each entry's prompt, marker and output as token ids (a written
    <|endoftext|> stays text). mask_prompt: items are (instruction_length, ids), exercise 7.2."""
    def __init__(self, data, tokenizer, style="alpaca", mask_prompt=False):  # 7.1, 7.2
        self.data = data
        self.mask_prompt = mask_prompt  # 7.2
        self.encoded_texts = []
        self.instruction_lengths = []  # 7.2: the prompt's token count, no marker
        phi3 = style == "phi3"  # 7.1
        for entry in data:
            instruction_plus_input = format_input_phi(entry) if phi3 else format_input(entry)  # 7.1
            marker = "\n<|assistant|>:\n" if phi3 else "\n\n### Response:\n"  # 7.1
            full_text = instruction_plus_input + marker + entry["output"]
            self.encoded_texts.append(tokenizer.encode_ordinary(full_text))
            self.instruction_lengths.append(len(tokenizer.encode_ordinary(instruction_plus_input)))  # 7.2

    def __getitem__(self, index):
        if self.mask_prompt:  # 7.2
            return self.instruction_lengths[index], self.encoded_texts[index]  # 7.2
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)

def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None,
                      device="cpu"):
    """The book's custom_collate_fn: id lists, or exercise 7.2's (instruction_length, ids) pairs
    -> inputs, targets (B, T), T the longest row (at most allowed_max_length). The book's example,
    rows [0..4], [5, 6], [7, 8, 9] with E = 50256 and _ = -100, gives
    inputs  [[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]] and
    targets [[1, 2, 3, 4, E], [6, E, _, _, _], [8, 9, E, _, _]]. Masks go by position, not value."""
    rows = [item[1] if isinstance(item, tuple) else item for item in batch]  # 7.2
    T = max(len(ids) for ids in rows)
    inputs = torch.full((len(rows), T), pad_token_id)
    # all -100 at first: the book's "every padding token but the first becomes -100" is done by
    # writing each row's real targets, and its one end-of-text, over them
    targets = torch.full((len(rows), T), ignore_index)
    for i, ids in enumerate(rows):
        n = len(ids)
        inputs[i, :n] = torch.tensor(ids)
        targets[i, :n - 1] = inputs[i, 1:n]  # position j predicts token j + 1
        targets[i, n - 1] = pad_token_id  # the one end-of-text to emit, so the model learns to stop
        if isinstance(batch[i], tuple):  # 7.2: no loss on the instruction's tokens
            targets[i, :batch[i][0] - 1] = ignore_index  # 7.2
    inputs = inputs[:, :allowed_max_length]
    targets = targets[:, :allowed_max_length]
    return inputs.to(device), targets.to(device)

# ---------------- the loss and the training loop (7.6)
def calc_loss_batch(input_batch, target_batch, model, device):
    """The mean cross-entropy over the batch's targets (the -100 ones are skipped)."""
    input_batch = input_batch.to(device)
    target_batch = target_batch.to(device)
    logits = model(input_batch)  # (B, T, vocab)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())

@torch.no_grad()
def calc_loss_loader(data_loader, model, device, num_batches=None):
    """The mean of the first num_batches batches' losses (None: all), as the book."""
    if len(data_loader) == 0:
        return float("nan")
    if num_batches is None:
        num_batches = len(data_loader)
    num_batches = min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i == num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches

def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer):
    """The book's loop: (train_losses, val_losses, tokens_seen) at every eval_freq-th step, each
    loss the mean of eval_iter batches; a greedy sample after start_context after each epoch."""
    train_losses = []
    val_losses = []
    track_tokens_seen = []
    tokens_seen = 0
    global_step = -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # clear the last batch's gradients
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()  # padding included, as the book counts
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                with torch.no_grad():  # as the book's evaluate_model
                    train_losses.append(calc_loss_loader(train_loader, model, device, eval_iter))
                    val_losses.append(calc_loss_loader(val_loader, model, device, eval_iter))
                track_tokens_seen.append(tokens_seen)
                model.train()
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {train_losses[-1]:.3f}, Val loss {val_losses[-1]:.3f}")
        model.eval()  # the sample: 50 greedy tokens after start_context
        context_size = model.pos_emb.weight.shape[0]
        encoded = torch.tensor([tokenizer.encode_ordinary(start_context)], device=device)
        token_ids = generate(model, encoded, 50, context_size)
        print(tokenizer.decode(token_ids[0].tolist()).replace("\n", " "))
        model.train()
    return train_losses, val_losses, track_tokens_seen

# ---------------- answers (7.7)
def respond(model, test_data, tokenizer, device, style="alpaca", max_new_tokens=256) -> list:  # 7.1
    """The book's loop over test_data: each greedy answer, the text after the prompt and marker."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    answers = []
    phi3 = style == "phi3"  # 7.1
    for entry in test_data:
        input_text = format_input_phi(entry) if phi3 else format_input(entry)  # 7.1
        marker = "<|assistant|>:" if phi3 else "### Response:"  # 7.1
        idx = torch.tensor([tokenizer.encode_ordinary(input_text)], device=device)
        token_ids = generate(model, idx, max_new_tokens, context_size, eos_id=50256)
        generated_text = tokenizer.decode(token_ids[0].tolist())
        answers.append(generated_text[len(input_text):].replace(marker, "").strip())
    return answers

# ================ the tool: what runs the job for real and fails well
import argparse, copy, json, math, os, pathlib, shutil, sys, tempfile, time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
import gpt
import judge
import tiktoken

IGNORE = -100  # targets that cross_entropy skips (its default ignore_index)
# each prompt style's response marker, taken out of its answers
STYLES = {"alpaca": "### Response:", "phi3": "<|assistant|>:", "chat": "<|assistant|>:"}
DATA = os.path.join(gpt.HERE, "data", "instruction-data.json")  # the book's 1,100 entries

def log(message):  # progress and notes go to stderr; answers and scores to stdout
    print(message, file=sys.stderr, flush=True)

def flag(default, help):
    return field(default=default, metadata={"help": help})

@dataclass
class TrainConfig:
    model: str = flag("gpt2-medium", "gpt2[-medium|-large|-xl], owner/name, a folder, or tiny")
    data: str = flag(DATA, "a JSON list or JSON Lines file of entries or conversations")
    out: str = flag(None, "the run folder (default: runs/<model name>)")
    style: str = flag("alpaca", "prompt style: alpaca or phi3 (exercise 7.1); conversations: chat")
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
    group_by_length: bool = flag(False, "batches of rows of like length: less padding")
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
        for f in fields(self):  # numbers are positive; those that switch a thing off may be 0
            value = getattr(self, f.name)
            may_be_zero = f.default == 0 or f.name in ("weight_decay", "seed")
            if f.type in (int, float) and not (0 < value < math.inf or (may_be_zero and value == 0)):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a positive number, not {value}")
        for name, allowed in (("style", STYLES), ("schedule", ("constant", "cosine")),
                              ("precision", ("auto", "bf16", "fp32"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)}: not one of {', '.join(allowed)}")
        if os.path.exists(self.data):  # absolute, so eval works from any folder
            self.data = os.path.abspath(self.data)

# ---------------- data files: Alpaca entries or conversations
# conversations' template: exercise 7.1's Phi-3 markers on every turn, 50256 after the assistant's
TURNS = {"system": "<|system|>\n{}\n", "user": "<|user|>\n{}\n", "assistant": "<|assistant|>:\n{}"}
OPEN_TURN = {"role": "assistant", "content": ""}  # an answer's prompt ends with its marker

def problem(entry, chat: bool):
    """What is wrong with an entry of its file's kind (conversations if chat), or None."""
    if not isinstance(entry, dict) or ("messages" in entry) != chat:
        return "not of the file's kind (a file holds Alpaca entries or conversations)"
    if not chat:
        entry = {"input": "", **entry}  # the only optional key
        for key in ("instruction", "input", "output"):
            if not isinstance(entry.get(key), str):
                return f"{key!r} is missing or not a string"
        return None
    messages = entry["messages"]
    if not (isinstance(messages, list) and messages):
        return "'messages' is not a list of messages"
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in TURNS or (role == "system" and k > 0):
            return f"message {k}: role {role!r} is not system (first only), user or assistant"
        if not isinstance(m.get("content"), str):
            return f"message {k}: 'content' is missing or not a string"
    if messages[-1]["role"] != "assistant":
        return "its last message is not the assistant's"
    return None

def load_entries(path: str = DATA) -> list:
    """A JSON list or JSON Lines of Alpaca entries or of conversations; a bad entry is named."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
        if text.lstrip().startswith("{"):  # JSON Lines as one list: errors name the file's lines
            lines = [line + "," if line.strip() else line for line in text.splitlines()]
            text = "[" + "\n".join(lines).rstrip().removesuffix(",") + "]"
        data = json.loads(text)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{path}: cannot read JSON ({getattr(e, 'strerror', '') or e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, found a {type(data).__name__}")
    chat = bool(data) and isinstance(data[0], dict) and "messages" in data[0]
    for i, entry in enumerate(data):
        wrong = problem(entry, chat)
        if wrong:
            raise ValueError(f"{path}: entry {i}: {wrong}")
    return data

def load_tokenizer():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", gpt.TIKTOKEN_CACHE)
    return tiktoken.get_encoding("gpt2")

# ---------------- conversations: their ids and targets
def chat_row(messages, enc, mask_prompt=False):
    """The template's ids, 50256 after each assistant turn but the last (collate adds it); with
    mask_prompt (is_answer, ids): is token j an assistant's?"""
    ids = []
    is_answer = []
    text = ""  # the turns since the last end-of-text, encoded at once as InstructionDataset's
    for m in messages:
        text += TURNS[m["role"]].format(m["content"])
        if m["role"] == "assistant":
            tokens = enc.encode_ordinary(text)
            start = len(text) - len(m["content"])
            ids += tokens + [gpt.EOT]
            is_answer += [at >= start for at in enc.decode_with_offsets(tokens)[1]] + [True]
            text = ""
    return (is_answer[:-1], ids[:-1]) if mask_prompt else ids[:-1]

def collate_turns(batch, allowed_max_length=None):
    """custom_collate_fn for (is_answer, ids) pairs: a target only where it is an answer's token."""
    rows = [ids for _, ids in batch]
    inputs, targets = custom_collate_fn(rows, allowed_max_length=allowed_max_length)
    for row, (is_answer, _) in zip(targets, batch):
        predicted = torch.tensor(is_answer[1:] + [True])  # position j predicts token j + 1
        # row: T targets (padded or cut), predicted: the row's n; mask where they overlap
        row[:len(predicted)][~predicted[:len(row)]] = IGNORE
    return inputs, targets

def row_length(item) -> int:
    """The token count of a row: ids, or (prompt length or is_answer, ids)."""
    return len(item[1] if isinstance(item, tuple) else item)

class GroupedBatches(BatchSampler):
    """--group-by-length, as transformers' Trainer: the shuffled rows in pools of 50 batches, each
    sorted by length and cut into batches; the batches shuffled, the longest row's first."""
    def __iter__(self):
        size = self.batch_size
        rows = list(self.sampler)[:len(self) * size]  # shuffled; drop_last drops as before
        length = [row_length(item) for item in self.sampler.data_source]
        batches = []
        for k in range(0, len(rows), 50 * size):
            pool = sorted(rows[k:k + 50 * size], key=length.__getitem__)
            batches += [pool[j:j + size] for j in range(0, len(pool), size)]
        order = torch.randperm(len(batches), generator=self.sampler.generator).tolist()
        batches = [batches[i] for i in order]
        longest = max(batches, key=lambda batch: max(length[i] for i in batch))
        batches.remove(longest)  # first: a run too big for the machine fails at its first step
        return iter([longest, *batches])

def real_share(batches, lengths) -> float:
    """The share of the batches' tokens that are rows', not padding (each padded to its longest)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    return real / sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

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
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError):
        raise ValueError(f"--device {name} is not available here; use auto or cpu") from None
    return torch.device(name)

def native_bf16(device: torch.device) -> bool:
    """Does the device compute bf16 natively? (Emulated bf16 is slower than fp32.)"""
    if device.type == "cuda":  # Ampere (8.0) on; a T4 is 7.5
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":  # Zen 4, Sapphire Rapids on
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False

def load_model(name: str, seed: int = 0) -> gpt.GPT:
    torch.manual_seed(seed)
    if name == "tiny":
        return gpt.GPT(gpt.GPTConfig(n_embd=128, n_layer=4, n_head=4))
    return gpt.from_pretrained(name)

def prepare_data(cfg, model, enc):
    entries = load_entries(cfg.data)[:cfg.limit or None]
    train_e, test_e, val_e = split(entries)
    if not (train_e and val_e and test_e):
        raise ValueError(f"{cfg.data}: {len(entries)} entries are too few to split: at least 10")
    cfg.max_length = min(cfg.max_length, model.config.n_positions)
    chat = "messages" in entries[0]
    if cfg.style == "chat" and not chat:
        raise ValueError(f"--style chat is for conversations, not {cfg.data}'s Alpaca entries")
    collate = partial(collate_turns if (chat and cfg.mask_prompt) else custom_collate_fn,
                      allowed_max_length=cfg.max_length)
    if chat:
        cfg.style = "chat"  # run.json keeps it: eval and generate follow
        train_set = [chat_row(e["messages"], enc, cfg.mask_prompt) for e in train_e]
        val_set = [chat_row(e["messages"], enc, cfg.mask_prompt) for e in val_e]
    else:
        train_set = InstructionDataset(train_e, enc, cfg.style, cfg.mask_prompt)
        val_set = InstructionDataset(val_e, enc, cfg.style, cfg.mask_prompt)
    cut = sum(row_length(item) > cfg.max_length for item in [*train_set, *val_set])
    log(f"data: {len(train_e)} train / {len(val_e)} validation / {len(test_e)} test entries; "
        f"{cut} cut to --max-length {cfg.max_length}")
    for name, items in (("training", train_set), ("validation", val_set)):
        masked = sum(bool((collate([item])[1] == IGNORE).all()) for item in items)
        if masked:
            log(f"{masked} of {len(items)} {name} rows keep no target (cut before their response)")
        # nothing to learn, or a validation batch without a mean
        if masked == len(items) or (masked and name == "validation"):
            raise ValueError(f"{masked} of {len(items)} {name} rows keep no target after --max-length"
                             f" {cfg.max_length} with --mask-prompt: raise it, or leave out --mask-prompt")
    if len(train_set) < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"--batch-size x --grad-accum is over the {len(train_set)} training rows")
    return train_set, val_set, val_e, collate

# ---------------- the loss plot
def _text(x: float, y: float, label, anchor="middle", more="") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{more}>{label}</text>'

def loss_svg(metrics: list, steps_per_epoch: int) -> str:
    """Train (solid) and validation (dashed) loss against optimizer steps, epochs marked."""
    losses = [m[k] for m in metrics for k in ("train_loss", "val_loss")]
    low = min(losses)
    span = max(max(losses) - low, 1e-9)
    last = max(metrics[-1]["step"], 1)
    def x(step):  # the plot area: x 60 to 620, y 20 (the highest loss) to 350 (the lowest)
        return 60 + 560 * step / last
    def y(loss):
        return 350 - 330 * (loss - low) / span
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="400" font-size="12">',
           '<rect width="640" height="400" fill="white"/>',
           '<path d="M60,20 V350 H620" stroke="black" fill="none"/>',
           _text(340, 390, "optimizer step"),
           _text(20, 185, "loss", more=' transform="rotate(-90 20 185)"')]
    for k in range(5):  # ticks
        step = round(last * k / 4)
        loss = low + span * k / 4
        svg.append(_text(x(step), 368, step))
        svg.append(_text(54, y(loss) + 4, f"{loss:.2f}", "end"))
    for epoch in range(1, last // steps_per_epoch + 1):
        at = x(epoch * steps_per_epoch)
        svg.append(f'<path d="M{at:.1f},20 V350" stroke="gray" stroke-dasharray="2,4"/>')
        svg.append(_text(at - 4, 344, f"epoch {epoch}", "end", ' fill="gray"'))
    curves = (("train_loss", "train", "#1f77b4", "none", "train: the steps since the last point"),
              ("val_loss", "validation", "#f80", "6,4",
               f"validation: the same {metrics[0]['val_rows']} rows at every point"))
    for row, (key, name, color, dash, legend) in enumerate(curves):
        style = f'stroke="{color}" stroke-width="2" fill="none" stroke-dasharray="{dash}"'
        points = " ".join(f"{x(m['step']):.1f},{y(m[key]):.1f}" for m in metrics)
        svg.append(f'<polyline id="{name}" {style} points="{points}"/>')
        svg.append(f'<path d="M330,{34 + 16 * row} h24" {style}/>')
        svg.append(_text(360, 38 + 16 * row, legend, "start"))
    return "\n".join(svg) + "\n</svg>\n"

# ---------------- the run folder
RESPONSES = "instruction-data-with-response"  # eval's file, as the book's; the judge's begin so

def claim_out(out: str):
    """Before the model loads: --out must be writable; its old answers and scores go."""
    try:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name.startswith(RESPONSES):  # they belong to other weights
                os.remove(os.path.join(out, name))
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ValueError(f"cannot write the run folder {out} ({e.strerror}); pick another --out")

def save_run(model, cfg, metrics: list, steps_per_epoch: int, done: dict):
    """Every file to .saving first, then the renames, run.json (settings + done) last."""
    staging = os.path.join(cfg.out, ".saving")
    if cfg.lora_rank:  # a copy with the adapters folded in: training goes on
        model = gpt.merge_lora(copy.deepcopy(model))
    try:
        gpt.save_pretrained(model, staging)
        texts = {"metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics),
                 "loss.svg": loss_svg(metrics, steps_per_epoch),
                 "run.json": json.dumps({**asdict(cfg), **done}, indent=2)}
        for name, text in texts.items():
            gpt.write_text(os.path.join(staging, name), text)
        for name in ("model.safetensors", "config.json", *gpt.TOKENIZER_FILES, *texts):
            os.replace(os.path.join(staging, name), os.path.join(cfg.out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

def lr_factor(step: int, steps: int, warmup_steps=0, cosine=False) -> float:
    """Appendix D, as transformers: the rate's factor at step 0 .. steps - 1."""
    if step < warmup_steps:
        return step / warmup_steps
    if not cosine:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (steps - warmup_steps)))

def loss_and_backward(model, micro_batches, device, bf16=False) -> tuple:
    """Gradients of the mean loss over all the micro-batches' targets, each calc_loss_batch
    weighted by its share -> (summed loss, count); bf16: autocast (validation stays fp32)."""
    counts = [int((targets != IGNORE).sum()) for _, targets in micro_batches]
    summed = torch.zeros((), device=device)
    for (inputs, targets), count in zip(micro_batches, counts):
        if count == 0:  # its mean is NaN, and it adds nothing
            continue
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            loss = calc_loss_batch(inputs, targets, model, device) * count
        (loss / sum(counts)).backward()
        summed += loss.detach()
    return summed, sum(counts)

def fit(model, optimizer, train_loader, val_loader, device, cfg, eval_iter, after_epoch):
    """The tool's train_model_simple: accumulation, appendix D's schedule, clipping, after_epoch."""
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    reports = []
    window = []  # (summed loss, target count) of each step since the last report
    tokens_seen = 0
    started = time.time()
    for epoch in range(1, cfg.epochs + 1):
        model.train()  # no dropout here: train mode only turns NEFTune's noise on
        batches = iter(train_loader)
        for step in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch):
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            lr = cfg.lr * lr_factor(step, cfg.epochs * steps_per_epoch, cfg.warmup_steps,
                                    cfg.schedule == "cosine")
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            window.append(loss_and_backward(model, micro_batches, device, cfg.precision == "bf16"))
            # the global norm before clipping; clipping to inf leaves the gradients as they are
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            optimizer.step()
            tokens_seen += sum(inputs.numel() for inputs, _ in micro_batches)
            if step % cfg.eval_every == 0:
                model.eval()
                val_loss = calc_loss_loader(val_loader, model, device, eval_iter)
                model.train()
                counted = sum(n for _, n in window)  # 0: no target since the last report, NaN
                train_loss = (sum(s for s, _ in window) / counted).item()
                window = []
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    raise ValueError(f"training diverged, or had no target (loss {train_loss}, "
                                     f"step {step}): lower --lr, or raise --max-length")
                log(f"epoch {epoch}, step {step}: train loss {train_loss:.3f} (its steps since "
                    f"the last report), validation loss {val_loss:.3f}")
                reports.append(dict(step=step, epoch=epoch, lr=lr, grad_norm=norm.item(),
                                    tokens=tokens_seen, train_loss=train_loss, val_loss=val_loss,
                                    seconds=round(time.time() - started, 2)))
        after_epoch(epoch, reports)

def train(cfg: TrainConfig):
    claim_out(cfg.out)  # first: an unwritable --out must not cost a training
    enc = load_tokenizer()
    device = pick_device(cfg.device)
    if cfg.precision == "auto":  # run.json keeps what it trained in
        cfg.precision = "bf16" if native_bf16(device) else "fp32"
    model = load_model(cfg.model, cfg.seed)
    train_set, val_set, val_e, collate_fn = prepare_data(cfg, model, enc)
    if cfg.lora_rank:
        model = gpt.add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if cfg.neftune_alpha:
        gpt.add_neftune(model, cfg.neftune_alpha)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    log(f"model: {cfg.model} on {device} in {cfg.precision}, {trainable:,} trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    rows = RandomSampler(train_set, generator=shuffle)  # each epoch a new order, --seed's
    batching = GroupedBatches if cfg.group_by_length else BatchSampler
    batches = batching(rows, cfg.batch_size, drop_last=True)
    train_loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate_fn)
    val_loader = DataLoader(val_set, cfg.batch_size, collate_fn=collate_fn)
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    state = shuffle.get_state()  # the run's batches drawn ahead, then again as it trains
    planned = [b for _ in range(cfg.epochs) for b in [*batches][:steps_per_epoch * cfg.grad_accum]]
    shuffle.set_state(state)
    share = real_share(planned, [min(row_length(item), cfg.max_length) for item in train_set])
    log(f"batches: {share:.1%} of their tokens are the rows', the rest padding")
    if share < 0.9 and not cfg.group_by_length:
        log("hint: --group-by-length batches rows of like length, for less padding")
    eval_iter = math.ceil(8 / cfg.batch_size)  # the curve: the first 8 rows or more
    curve_rows = min(eval_iter * cfg.batch_size, len(val_set))
    log(f"training: lr {cfg.lr:g}, effective batch {cfg.batch_size * cfg.grad_accum} "
        f"({cfg.batch_size} x {cfg.grad_accum}), {steps_per_epoch * cfg.epochs} steps; validation "
        f"on {curve_rows} rows at each report, on all {len(val_set)} after each epoch")
    saved = []
    def save(epoch, reports):
        log(f"epoch {epoch}'s answer to the first validation entry: "
            + answer(model, val_e[:1], enc, cfg.style, 50)[0].replace("\n", " "))
        val_loss = calc_loss_loader(val_loader, model, device)
        metrics = [{**r, "val_rows": curve_rows} for r in reports]
        done = {"epochs_done": epoch, "val_loss": val_loss, "val_rows": len(val_set)}
        save_run(model, cfg, metrics, steps_per_epoch, done)
        saved.append(epoch)
        log(f"epoch {epoch}: validation loss {val_loss:.3f} on all {len(val_set)} rows; saved")
    try:
        fit(model, optimizer, train_loader, val_loader, device, cfg, eval_iter, save)
    except KeyboardInterrupt:
        kept = f"{cfg.out} holds epoch {len(saved)}"
        if not saved:
            kept = f"no epoch of this run finished; {cfg.out} holds what it held before"
        raise KeyboardInterrupt(kept) from None

def answer(model, entries, enc, style="alpaca", max_new_tokens=256, progress=False,
           **sampling) -> list:
    """respond()'s answers, fast: 32 prompts of like length at a time through generate_batch."""
    model.eval()
    if style == "chat":  # a conversation's turns before its last, then the assistant's marker
        prompts = [chat_row(e["messages"][:-1] + [OPEN_TURN], enc) for e in entries]
    else:
        format_prompt = format_input_phi if style == "phi3" else format_input
        prompts = [enc.encode_ordinary(format_prompt(e)) for e in entries]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for k in range(0, len(order), 32):
        chunk = order[k:k + 32]
        new_ids = gpt.generate_batch(model, [prompts[i] for i in chunk], max_new_tokens,
                                     eos_id=gpt.EOT, **sampling)
        for i, ids in zip(chunk, new_ids):
            answers[i] = enc.decode(ids).replace(STYLES[style], "").strip()
        if progress:
            log(f"answered {k + len(chunk)} of {len(prompts)}")
    return answers

# ---------------- the commands and the command line
def load_run(out: str, device: str):
    try:  # no run there, or a hand-edited run.json: one line, whatever is wrong
        settings = json.loads(pathlib.Path(out, "run.json").read_text(encoding="utf-8"))
        for key in ("epochs_done", "val_loss", "val_rows"):  # train's, not settings
            settings.pop(key, None)
        cfg = TrainConfig(**settings)
        model = load_model(out)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{out}: holds no run that train wrote ({e}); train one there") from None
    return model.to(pick_device(device)), cfg

def generate_command(a):
    """generate: answers on stdout to the instruction, or each stdin line (a chat's next turn)."""
    if a.temperature < 0 or (a.top_k is not None and a.top_k < 1):
        raise ValueError("--temperature must be 0 or more, and --top-k 1 or more")
    model, cfg = load_run(a.out, a.device)
    chat = cfg.style == "chat"
    if (a.system and not chat) or (a.input and chat):
        raise ValueError(f"{a.out}: --system is for runs on conversations, --input for the others")
    enc = load_tokenizer()
    top_k = None if a.top_k is None else min(a.top_k, model.config.vocab_size)
    from_stdin = a.instruction is None
    if from_stdin and sys.stdin.isatty():  # in a pipe, nothing but the answers
        log("instructions, one per line (Ctrl-D ends):")
    system = [{"role": "system", "content": a.system}] if a.system else []
    history = []
    told = False  # that the oldest turns go, said once
    room = model.config.n_positions - a.max_new_tokens  # the prompt's share of the context
    for line in sys.stdin if from_stdin else [a.instruction]:
        entry = {"instruction": line.rstrip("\n"), "input": a.input}
        if chat:
            history.append({"role": "user", "content": line.rstrip("\n")})
            while len(history) > 1 and len(chat_row(system + history + [OPEN_TURN], enc)) > room:
                if not told:
                    log("the conversation outgrew the context: its oldest turns are left out")
                told = True
                del history[:2]  # the oldest whole turn: a user's line and its answer
            entry = {"messages": system + history + [OPEN_TURN]}
        torch.manual_seed(a.seed)  # the same seed, the same answer
        answer_text = answer(model, [entry], enc, cfg.style, a.max_new_tokens,
                             temperature=a.temperature, top_k=top_k)[0]
        history.append({"role": "assistant", "content": answer_text})
        if from_stdin:  # one line per answer: its own line breaks are written as \n
            answer_text = answer_text.replace("\n", "\\n")
        print(answer_text, flush=True)

def judge_parts(entry) -> tuple:
    """The judge's input and correct output: the book's, or a conversation's turns and last one."""
    if "messages" not in entry:
        return format_input(entry), entry["output"]
    *before, last = entry["messages"]
    ends = {"assistant": "<|endoftext|>"}  # 50256 in the ids, as text here
    text = "".join(TURNS[m["role"]].format(m["content"]) + ends.get(m["role"], "") for m in before)
    return text, last["content"]

def judge_file(path: str, key: str, a):
    """Score every entry's response into X-scores.json beside X.json."""
    entries = load_entries(path)
    for i, e in enumerate(entries):
        if not isinstance(e.get(key), str):
            raise ValueError(f"{path}: entry {i} has no string {key!r}; pick the field with --key")
    prompts = [judge.judge_prompt(*judge_parts(e), e[key]) for e in entries]
    stem = path.removesuffix(".json")
    scores = judge.score_all(prompts, stem + "-scores.jsonl", a.judge, a.url, a.timeout)
    entries = [{**e, "score": score} for e, score in zip(entries, scores)]
    scored = [s for s in scores if s is not None]
    average = sum(scored) / len(scored) if scored else None
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
    test = split(load_entries(cfg.data)[:cfg.limit or None])[1]
    responses = answer(model, test, load_tokenizer(), cfg.style, progress=True)
    path = os.path.join(a.out, RESPONSES + ".json")
    answered = [{**e, "model_response": r} for e, r in zip(test, responses)]
    gpt.write_text(path, json.dumps(answered, indent=2))
    for e in answered[:3]:  # as the book shows them
        question, correct = judge_parts(e)
        log(f"\n{e.get('instruction', question)}\n\nCorrect response:\n>> {correct}\n\n"
            f"Model response:\n>> {e['model_response']}\n{'-' * 40}")
    log(f"{len(test)} test responses -> {path}; {responses.count('')} of them empty")
    try:
        judge_file(path, "model_response", a)
    except (ValueError, OSError) as e:  # the scores so far are kept: a rerun asks the rest
        raise ValueError(f"{e}; the responses are saved: score them with python sft.py judge "
                         f"{path}") from None

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
    for f in fields(TrainConfig):
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
        p.add_argument("--judge", default=judge.JUDGE, help="the model that scores (llama3)")
        p.add_argument("--url", help="the judge's server (default $OLLAMA_HOST, :11434), or .../v1")
        p.add_argument("--timeout", type=float, default=judge.TIMEOUT, help="seconds for one reply")
    ge = sub.add_parser("generate", help="answer instructions with a trained run, on stdout")
    ge.add_argument("instruction", nargs="?", help="the instruction (none: one per line of stdin)")
    ge.add_argument("--input", default="", help="the instruction's input, if any")
    ge.add_argument("--system", default="", help="a conversations run's system message")
    ge.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); >0: sample")
    ge.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    ge.add_argument("--seed", type=int, default=123, help="the sampling's seed (default 123)")
    for p in (ev, ge):
        p.add_argument("--out", default="runs/gpt2-medium", help="a run folder written by train")
        p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    a = ap.parse_args(argv)
    command = vars(a).pop("cmd")  # a keeps the command's flags alone
    commands = {"train": lambda a: train(TrainConfig(**vars(a))), "eval": eval_command,
                "generate": generate_command, "judge": lambda a: judge_file(a.file, a.key, a)}
    run_cli(commands[command], a)

if __name__ == "__main__":
    main()
