"""sft.py stage 1: entries -> prompts -> tokens -> batches. The collate rules as properties: R1 inputs are the ids then
padding, R2 targets the ids shifted then one end-of-text then ignored, R3 prompt masking, R4 truncation, R5 masks go by
position, never by value."""
import json, os, subprocess, sys

import pytest
from functools import partial
from torch.utils.data import DataLoader
from hypothesis import given, settings, strategies as st

import gpt
import sft
from conftest import DATA

EOT, IGN = gpt.EOT, -100  # the book's pad_token_id and ignore_index
token = st.one_of(st.integers(0, 50255), st.just(EOT))  # end-of-text ids inside the data are common enough


@st.composite
def rows(draw):
    ids = draw(st.lists(token, min_size=1, max_size=12))
    return ids, draw(st.integers(1, len(ids)))  # prompt_len = len(ids) happens too


batches = st.lists(rows(), min_size=1, max_size=5)
options = st.fixed_dictionaries({"max_length": st.one_of(st.none(), st.integers(1, 14)), "mask_prompt": st.booleans()})


def collate(batch, max_length=None, mask_prompt=False):
    """sft.custom_collate_fn on rows (ids, prompt_len): the book's id lists, or with mask_prompt exercise 7.2's (prompt_len, ids)."""
    items = [(plen, ids) if mask_prompt else ids for ids, plen in batch]
    return sft.custom_collate_fn(items, allowed_max_length=max_length)


def full(batch, **kw):
    """The collate without truncation, to compare truncated output against."""
    return collate(batch, mask_prompt=kw.get("mask_prompt", False))


@settings(max_examples=300)
@given(batches, options)
def test_R1_inputs_are_the_ids_then_padding(batch, kw):
    inputs, _ = full(batch, **kw)
    for row, (ids, _) in zip(inputs.tolist(), batch):
        assert row == ids + [EOT] * (len(row) - len(ids))


@settings(max_examples=300)
@given(batches)
def test_R2_targets_are_ids_shifted_then_one_end_of_text_then_ignored(batch):
    _, targets = collate(batch)
    for row, (ids, _) in zip(targets.tolist(), batch):
        n = len(ids)
        assert row[:n - 1] == ids[1:] and row[n - 1] == EOT and set(row[n:]) <= {IGN}
        assert sum(t != IGN for t in row) == n  # exactly one end-of-text beyond the ids' own


@settings(max_examples=300)
@given(batches)
def test_R3_prompt_masking_ignores_exactly_the_prompt_predictions(batch):
    _, plain = collate(batch)
    _, masked = collate(batch, mask_prompt=True)
    for a, b, (ids, plen) in zip(plain.tolist(), masked.tolist(), batch):
        assert b[:plen - 1] == [IGN] * (plen - 1)
        assert b[plen - 1:] == a[plen - 1:]
        assert b[len(ids) - 1] == EOT  # even a row that is all prompt keeps its end-of-text


@settings(max_examples=300)
@given(batches, options)
def test_R4_truncation_keeps_the_first_max_length_columns(batch, kw):
    inputs, targets = collate(batch, **kw)
    whole_in, whole_tg = full(batch, **kw)
    width = max(len(ids) for ids, _ in batch)
    assert inputs.shape[1] == targets.shape[1] == min(width, kw["max_length"] or width)
    assert inputs.tolist() == whole_in[:, :inputs.shape[1]].tolist()
    assert targets.tolist() == whole_tg[:, :inputs.shape[1]].tolist()


@settings(max_examples=300)
@given(batches, options)
def test_R5_an_end_of_text_inside_the_ids_stays_a_target(batch, kw):
    _, targets = collate(batch, **kw)
    for row, (ids, plen) in zip(targets.tolist(), batch):
        for j in range(len(row)):
            if j + 1 < len(ids) and ids[j + 1] == EOT and not (kw["mask_prompt"] and j < plen - 1):
                assert row[j] == EOT


@settings(max_examples=200)
@given(batches)
def test_padding_is_per_batch_to_the_longest_row(batch):
    inputs, targets = collate(batch)
    assert inputs.shape == targets.shape == (len(batch), max(len(ids) for ids, _ in batch))


def test_the_books_worked_example():
    inputs, targets = sft.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert targets.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, IGN, IGN, IGN], [8, 9, EOT, IGN, IGN]]
    _, masked = sft.custom_collate_fn([(3, [0, 1, 2, 3, 4]), (1, [5, 6]), (2, [7, 8, 9])])  # exercise 7.2's (prompt_len, ids)
    assert masked.tolist() == [[IGN, IGN, 3, 4, EOT], [6, EOT, IGN, IGN, IGN], [IGN, 9, EOT, IGN, IGN]]


def test_the_books_dataloader_call_gives_batches_on_the_device_asked_for():
    dataset = sft.InstructionDataset(json.loads(DATA.read_text())[:20], sft.load_tokenizer())
    collate_fn = partial(sft.custom_collate_fn, device="meta", allowed_max_length=1024)  # the book's call (meta: a device)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate_fn, shuffle=False, drop_last=False, num_workers=0)
    batches = list(loader)
    assert [tuple(inputs.shape)[0] for inputs, _ in batches] == [8, 8, 4]
    assert all(inputs.device.type == targets.device.type == "meta" for inputs, targets in batches)
    inputs, targets = sft.custom_collate_fn([dataset[i] for i in range(8)])
    assert inputs.shape == batches[0][0].shape and inputs[0, :len(dataset[0])].tolist() == dataset[0]


# ---------------------------------------------------------------- the book's data
def test_books_split_and_prompt_templates_to_the_character():
    entries = sft.load_entries()  # the default: the book's file, shipped in data/
    assert entries == sft.load_entries(str(DATA)) and sft.TrainConfig().data == str(DATA)
    train, test, val = sft.split(entries)  # the book's order
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train == entries[:935] and test == entries[935:1045] and val == entries[1045:]
    e50, e999 = entries[50], entries[999]
    assert e50["input"] and not e999["input"]
    head = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert sft.format_input(e50) == f"{head}\n\n### Instruction:\n{e50['instruction']}\n\n### Input:\n{e50['input']}"
    assert sft.format_input(e999) == f"{head}\n\n### Instruction:\n{e999['instruction']}"  # the book's: no marker
    assert sft.format_input_phi(e50) == f"<|user|>\n{e50['instruction']}\n{e50['input']}"  # exercise 7.1
    assert sft.format_input_phi(e999) == f"<|user|>\n{e999['instruction']}"
    assert sft.STYLES == {"alpaca": "### Response:", "phi3": "<|assistant|>:", "chat": "<|assistant|>:"}  # the markers
    enc = sft.load_tokenizer()  # the training texts: the prompt, the marker on its own line, the output
    for style, text in (("alpaca", f"{sft.format_input(e50)}\n\n### Response:\n{e50['output']}"),
                        ("phi3", f"<|user|>\n{e50['instruction']}\n{e50['input']}\n<|assistant|>:\n{e50['output']}")):
        assert enc.decode(sft.InstructionDataset([e50], enc, style).encoded_texts[0]) == text


def test_tokens_are_the_whole_text_encoded_at_once_and_end_of_text_in_data_is_plain_text():
    enc = sft.load_tokenizer()
    entry = {"instruction": "Say <|endoftext|> twice.", "input": "", "output": "<|endoftext|> <|endoftext|>"}
    plen, ids = sft.InstructionDataset([entry], enc, mask_prompt=True)[0]
    assert EOT not in ids and sft.InstructionDataset([entry], enc)[0] == ids
    assert ids == enc.encode_ordinary(sft.format_input(entry) + "\n\n### Response:\n" + entry["output"])  # the book's
    # exercise 7.2's instruction length is the prompt's alone: the marker's tokens stay targets
    assert plen == len(enc.encode_ordinary(sft.format_input(entry)))
    assert enc.decode(ids[:plen]) == sft.format_input(entry)
    assert enc.decode(ids[plen:]) == "\n\n### Response:\n" + entry["output"]
    _, targets = sft.custom_collate_fn([(plen, ids)])
    kept = targets[0][targets[0] != IGN].tolist()
    assert kept == ids[plen:] + [EOT]  # from the marker's first token on, then the one end-of-text
    assert enc.decode(kept[:6]) == "\n\n### Response:\n"
    phi_len, phi_ids = sft.InstructionDataset([entry], enc, "phi3", mask_prompt=True)[0]
    assert enc.decode(phi_ids[phi_len:]) == "\n<|assistant|>:\n" + entry["output"]


def test_the_tokenizer_works_offline_from_the_shipped_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", TMPDIR=str(tmp_path))  # no network
    code = "import sft; print(sft.load_tokenizer().encode('Hello world<|endoftext|>', allowed_special='all'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=DATA.parents[1])
    assert p.stdout == "[15496, 995, 50256]\n", p.stderr  # GPT-2's ids, as the book shows for "Hello world"


BAD = {
    "missing file": (None, r"nope\.json: cannot read JSON \(No such file"),
    "malformed JSON": ('[{"instruction": "a",\n "output": }]', r"cannot read JSON \(Expecting value: line 2 column 12"),
    "not a list": ('"a", "b"', r"cannot read JSON \(Extra data"),
    "not a list of entries": ('"ab"', r"expected a JSON list of entries, found a str"),
    "entry without output": ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"entry 1: 'output' is missing or not a string"),
    "non-string field": ('[{"instruction": "a", "input": 3, "output": "b"}]', r"entry 0: 'input' is missing or not a string"),
    "entry not an object": ('[{"instruction": "a", "output": "b"}, "hi"]', r"entry 1: not of the file's kind"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_is_one_clear_error_naming_file_and_entry(tmp_path, case):
    text, message = BAD[case]
    path = tmp_path / ("nope.json" if text is None else "d.json")
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        sft.load_entries(str(path))
    assert str(path) in str(err.value)


def test_too_few_entries_to_split_names_the_source(tmp_path, capsys):
    from test_cli import run
    path = tmp_path / "small.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 20))
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", path, "--limit", 9, "--out", tmp_path / "run")
    assert code == f"error: {path}: 9 entries are too few to split: at least 10"  # --limit 9: no test entry
    assert "step 0" not in err
    assert [len(x) for x in sft.split([{}] * 10)] == [8, 1, 1]
    assert [len(x) for x in sft.split([{}] * 20)] == [17, 2, 1]
    assert [len(x) for x in sft.split([{}] * 9)] == [7, 0, 2]  # the book's split: arithmetic only, no error
