"""Instruction finetuning of GPT-2: data -> prompts -> tokens -> batches -> training -> responses, and the CLI."""
import hashlib, json, os, re

from gpt import cache_dir, download
import torch
from torch.nn.utils.rnn import pad_sequence
import tiktoken

DATA_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
EOT = 50256      # <|endoftext|>: pads the batches and is the one end target each row keeps
IGNORE = -100    # targets that cross_entropy skips
SPLIT = (0.85, 0.10)  # train and test fractions, as the book; validation gets the rest
STYLES = {  # (instruction, input when non-empty, response marker)
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
               "\n\n### Instruction:\n{instruction}", "\n\n### Input:\n{input}", "\n\n### Response:\n"),
    "phi3": ("<|user|>\n{instruction}", "\n{input}", "\n<|assistant|>\n"),
}


# ---------------------------------------------------------------- data
def _json_lines(text: str) -> list:
    """The JSON values of a .jsonl text, one after another (errors keep their line and column)."""
    decoder, space, pos, out = json.JSONDecoder(), re.compile(r"\s*"), 0, []
    while (pos := space.match(text, pos).end()) < len(text):
        value, pos = decoder.raw_decode(text, pos)
        out.append(value)
    return out


def load_entries(source: str = DATA_URL) -> list:
    """A JSON list (or .jsonl) of {instruction, input?, output} from a path or URL (downloaded once, cached)."""
    path = source
    if source.startswith(("http://", "https://")):
        path = os.path.join(cache_dir("data"), hashlib.sha1(source.encode()).hexdigest()[:8] + "-" + source.rsplit("/", 1)[-1])
        if not os.path.exists(path):
            download(source, path, "check the URL, or pass a local file with --data PATH")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the data ({getattr(e, 'strerror', None) or e}); pass --data PATH or URL") from None
    try:
        data = _json_lines(text) if path.endswith(".jsonl") else json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, found a {type(data).__name__}")
    for i, e in enumerate(data):
        for key in ("instruction", "input", "output"):
            if not isinstance(e, dict):
                raise ValueError(f"{path}: entry {i} is a {type(e).__name__}, not an object with instruction/input/output")
            if key not in e and key != "input" or key in e and not isinstance(e[key], str):
                raise ValueError(f"{path}: entry {i}: {key!r} " + (f"must be a string, not {type(e[key]).__name__}" if key in e else "is missing"))
    return data


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
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken fetches its files once; offline it fails in several ways
        raise ValueError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); go online once or set TIKTOKEN_CACHE_DIR") from None


def tokenize(entries: list, enc, style: str = "alpaca") -> list:
    """[(ids, prompt_len)]: ids = enc(prompt) + enc(output); <|endoftext|> in the text stays plain text."""
    prompts = enc.encode_ordinary_batch([format_prompt(e, style) for e in entries])
    outputs = enc.encode_ordinary_batch([e["output"] for e in entries])
    return [(p + o, len(p)) for p, o in zip(prompts, outputs)]


# ---------------------------------------------------------------- batches
def collate(batch, pad_id=EOT, ignore_index=IGNORE, max_length=None, mask_prompt=False):
    """[(ids, prompt_len)] -> inputs, targets (B, T), T the longest row (at most max_length); CPU tensors.

    Masking is by position, never by value: an end-of-text id inside ids stays a target."""
    n = torch.tensor([len(ids) for ids, _ in batch])[:, None]        # (B, 1) row lengths
    p = torch.tensor([plen for _, plen in batch])[:, None]            # (B, 1) prompt lengths
    seq = pad_sequence([torch.tensor(ids + [pad_id]) for ids, _ in batch], batch_first=True, padding_value=pad_id)
    col = torch.arange(seq.shape[1] - 1)[None]                       # (1, T)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()                # target at n-1 is the appended end-of-text
    targets[(col >= n) | (col < p - 1) & mask_prompt] = ignore_index  # padding; and the prompt, if asked
    return (inputs[:, :max_length], targets[:, :max_length]) if max_length else (inputs, targets)
