"""Rules that the other tests left unpinned: each test here was seen to fail with its bug planted by hand."""
import json, os, struct

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import gpt
import sft
from conftest import FIXTURE, tiny_model

CPU = torch.device("cpu")
ROWS = [([5, 9, 14, 3, 7, 1], 2), ([8, 2], 1), ([4, 4, 6, 11, 30, 2, 9, 9, 1, 3], 7), ([7, 3, 5], 1)]
PLAIN = [ids for ids, _ in ROWS]  # the book's dataset items
MASKED = [(prompt_len, ids) for ids, prompt_len in ROWS]  # exercise 7.2's


def reference_mean_loss(model, rows, mask_prompt=False):
    """Cross-entropy averaged over every target token of all rows at once, without collate or batching."""
    logits, targets = [], []
    for ids, prompt_len in rows:
        with torch.no_grad():
            logits.append(model(torch.tensor([ids]))[0])
        target = ids[1:] + [sft.EOT]
        if mask_prompt:
            target = [sft.IGNORE] * (prompt_len - 1) + target[prompt_len - 1:]
        targets.append(torch.tensor(target))
    return F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=sft.IGNORE).item()


def test_the_step_loss_is_the_mean_over_target_tokens_and_its_gradient_matches():
    model = tiny_model(seed=7, vocab=50257)
    micro = [sft.collate(PLAIN[:1]), sft.collate(PLAIN[1:])]  # 6 targets, then 2 + 10 + 3
    loss, count = sft.loss_and_backward(model, micro, CPU)
    assert count == 21 and (loss / count).item() == pytest.approx(reference_mean_loss(model, ROWS), rel=1e-5)
    got = model.h[0].mlp.c_fc.weight.grad.clone()
    model.zero_grad()
    inputs, targets = sft.collate(PLAIN)
    F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=sft.IGNORE).backward()
    assert torch.allclose(got, model.h[0].mlp.c_fc.weight.grad, atol=1e-6)


def test_validation_loss_is_token_weighted_not_a_mean_of_batch_means():
    model = tiny_model(seed=8, vocab=50257)
    loader = DataLoader(MASKED, batch_size=3, collate_fn=sft.collate)  # batches of 5 + 2 + 4 targets, then 3
    assert sft.calc_loss_loader(loader, model, "cpu") == pytest.approx(reference_mean_loss(model, ROWS, True), rel=1e-5)
    first = sft.calc_loss_loader(loader, model, "cpu", num_batches=1)
    assert first == pytest.approx(reference_mean_loss(model, ROWS[:3], True), rel=1e-5)


def test_lora_scales_its_update_by_alpha_over_rank():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4)
    lora = gpt.LoRALinear(base, rank=2, alpha=8.0)
    torch.nn.init.normal_(lora.B)
    x = torch.randn(3, 6)
    expected = base(x) + (8.0 / 2) * (x @ lora.A.t() @ lora.B.t())
    assert torch.allclose(lora(x), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_float32(tmp_path, dtype):
    tensors = gpt.read_safetensors(FIXTURE / "model.safetensors")
    gpt.write_safetensors(tmp_path / "model.safetensors", {k: v.to(dtype) for k, v in tensors.items()})
    (tmp_path / "config.json").write_text((FIXTURE / "config.json").read_text())
    assert {p.dtype for p in gpt.from_pretrained(str(tmp_path)).parameters()} == {torch.float32}


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def write_then_fail(f):
        f.write(b"new, half")
        assert path.read_text() == "old"  # written elsewhere, not in place
        raise RuntimeError("disk pulled out")
    with pytest.raises(RuntimeError):
        gpt._atomic_write(str(path), write_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def header_of(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def test_the_writer_names_each_dtype_as_the_format_does_and_pads_the_header(tmp_path):
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    for length in range(1, 9):  # names of every length mod 8
        path = tmp_path / f"{length}.safetensors"
        gpt.write_safetensors(path, {"x" * length + k: torch.zeros(3, dtype=t) for k, t in names.items()})
        n, header = header_of(path)
        assert n % 8 == 0  # the data, and so each tensor, starts 8-byte aligned
        assert {k[length:]: v["dtype"] for k, v in header.items()} == {k: k for k in names}


def test_the_reader_maps_the_file_rather_than_copying_it(tmp_path):
    path = tmp_path / "big.safetensors"
    gpt.write_safetensors(path, {"w": torch.ones(1 << 20)})
    tensor = gpt.read_safetensors(path)["w"]
    address = tensor.data_ptr()
    maps = open("/proc/self/maps").read().splitlines()
    mapped = [m for m in maps if m.endswith(str(path))]
    spans = [[int(a, 16) for a in m.split()[0].split("-")] for m in mapped]
    assert any(lo <= address < hi for lo, hi in spans)


def test_an_over_long_prompt_keeps_its_newest_context_minus_one_tokens_and_generation_stops_at_the_context():
    model = tiny_model(seed=9)  # context 64
    prompt = list(range(1, 101))
    got = gpt.generate_batch(model, [prompt], 10)
    assert len(got[0]) == 1  # 63 prompt tokens + 1 new fill the context
    with torch.no_grad():
        expected = int(model(torch.tensor([prompt[-63:]]))[0, -1].argmax())
    assert got[0] == [expected]
    assert len(gpt.generate_batch(model, [prompt[:60]], 10)[0]) == 4  # 60 + 4 = 64


def test_each_prompt_has_its_own_budget_so_a_long_neighbour_cuts_no_answer():
    model = tiny_model(seed=9)  # context 64
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (2, 10, 60, 63)]
    alone = [gpt.generate_batch(model, [p], 20)[0] for p in prompts]
    assert [len(a) for a in alone] == [20, 20, 4, 1]  # each until its own positions reach 64
    assert gpt.generate_batch(model, prompts, 20) == alone


def test_the_split_truncates_fractions_as_the_book_does():
    entries = [{"instruction": str(i), "output": ""} for i in range(30)]  # 0.85 x 30 = 25.5: int 25, round 26
    train, val, test = sft.split(entries)
    assert (len(train), len(val), len(test)) == (25, 2, 3)


# ---------------------------------------------------------------- more rules found by planting bugs
def small_base(tmp_path):
    """A local checkpoint folder: F32, so it loads memory-mapped."""
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=96, n_embd=32, n_layer=2, n_head=4)), tmp_path / "base")
    return tmp_path / "base"


def test_training_never_writes_into_the_checkpoint_it_was_loaded_from(tmp_path, capsys):
    from test_cli import MEMO, run, write_data
    base = small_base(tmp_path)
    before = {name: (base / name).read_bytes() for name in os.listdir(base)}
    data = write_data(tmp_path / "d.json", MEMO)
    for extra in ([], ["--lora-rank", "4"]):  # AdamW's in-place updates; a LoRA merge
        out = tmp_path / f"run{len(extra)}"
        code, _, err = run(capsys, "train", "--model", base, "--data", data, "--out", out, "--epochs", 1,
                           "--batch-size", 2, *extra)
        assert code == 0, err
        assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]  # it did train
    assert {name: (base / name).read_bytes() for name in os.listdir(base)} == before


TRAINING_STEP = sft.loss_and_backward


def batches_seen(monkeypatch, capsys, tmp_path, base, *flags):
    """The rows of every step of a tiny training, in order, as tuples of ids (MEMO holds no 50256)."""
    from test_cli import MEMO, run, write_data
    seen = []

    def recording(model, micro_batches, *args):
        rows = [inputs[i, inputs[i] != sft.EOT] for inputs, _ in micro_batches for i in range(len(inputs))]
        seen.append([tuple(row.tolist()) for row in rows])  # each row without its padding
        return TRAINING_STEP(model, micro_batches, *args)
    monkeypatch.setattr(sft, "loss_and_backward", recording)
    data = write_data(tmp_path / "d.json", MEMO)
    code, _, err = run(capsys, "train", "--model", base, "--data", data, "--out", tmp_path / "run",
                       "--batch-size", 2, *flags)
    assert code == 0, err
    return seen


def test_the_seed_decides_the_batch_order_and_each_epoch_is_shuffled_anew(monkeypatch, capsys, tmp_path):
    base = small_base(tmp_path)
    first = batches_seen(monkeypatch, capsys, tmp_path, base, "--seed", 1)
    assert batches_seen(monkeypatch, capsys, tmp_path, base, "--seed", 1) == first
    other = batches_seen(monkeypatch, capsys, tmp_path, base, "--seed", 2)
    assert len(first) == len(other) == 8  # 8 training rows, 2 a step, 2 epochs
    assert other != first
    epoch_1, epoch_2 = first[:4], first[4:]
    assert sorted(sum(epoch_1, [])) == sorted(sum(epoch_2, [])) and epoch_1 != epoch_2  # same rows, new order


def prompts_answered(monkeypatch):
    """Patches gpt.generate_batch to record the prompt ids it is given (and answer nothing)."""
    seen = []

    def recording(model, prompts, max_new_tokens, **options):
        seen.extend(prompts)
        return [[] for _ in prompts]
    monkeypatch.setattr(gpt, "generate_batch", recording)
    return seen


def test_an_answers_prompt_is_plain_text_as_in_training(monkeypatch):
    enc = sft.tokenizer()
    entry = {"instruction": "Repeat <|endoftext|> twice.", "input": "a <|endoftext|> b", "output": ""}
    seen = prompts_answered(monkeypatch)
    assert sft.answer(tiny_model(), [entry], enc) == [""]
    prompt_len, ids = sft.InstructionDataset([entry], enc, mask_prompt=True)[0]
    assert seen == [ids[:prompt_len]]  # the ids training gives the prompt
    assert sft.EOT not in seen[0]  # the written marker is characters, not the special token


def test_generate_answers_in_the_runs_own_prompt_style(tmp_path, capsys, monkeypatch):
    from test_cli import MEMO, fake_run, run
    out = fake_run(tmp_path, MEMO, style="phi3")
    seen = prompts_answered(monkeypatch)
    code, _, err = run(capsys, "generate", "--out", out, "Name a color.", "--input", "bright")
    assert code == 0, err
    assert sft.tokenizer().decode(seen[0]) == "<|user|>\nName a color.\nbright\n<|assistant|>\n"


def test_a_lora_run_keeps_training_after_its_first_save(tmp_path, capsys, monkeypatch):
    from test_cli import MEMO, run, write_data
    out = tmp_path / "run"
    base = small_base(tmp_path)
    weights = [gpt.read_safetensors(base / "model.safetensors")["h.0.attn.c_attn.weight"]]
    save = sft.save_run

    def recording(*args):
        save(*args)
        weights.append(gpt.read_safetensors(out / "model.safetensors")["h.0.attn.c_attn.weight"].clone())
    monkeypatch.setattr(sft, "save_run", recording)
    data = write_data(tmp_path / "d.json", MEMO)
    code, _, err = run(capsys, "train", "--model", base, "--data", data, "--out", out, "--epochs", 2,
                       "--batch-size", 2, "--lora-rank", 4, "--lr", 1e-3)
    assert code == 0, err
    first = (weights[1] - weights[0]).abs().max()
    second = (weights[2] - weights[1]).abs().max()
    assert first > 0 and second > first / 10  # the second epoch moved the weights as the first did


def test_run_json_is_renamed_into_the_folder_after_every_other_file(tmp_path, capsys, monkeypatch):
    from test_cli import MEMO, RUN_FOLDER, run, write_data
    renamed = []
    replace = os.replace

    def recording(src, dst):
        if ".saving" in str(src) and ".saving" not in str(dst):  # from the staging folder into the run
            renamed.append(os.path.basename(dst))
        replace(src, dst)
    monkeypatch.setattr(os, "replace", recording)
    data = write_data(tmp_path / "d.json", MEMO)
    base = small_base(tmp_path)
    assert run(capsys, "train", "--model", base, "--data", data, "--out", tmp_path / "run", "--epochs", 1)[0] == 0
    assert sorted(renamed) == RUN_FOLDER and renamed[-1] == "run.json"


def test_tokens_seen_count_what_training_sees_a_cut_row_its_kept_tokens(tmp_path, capsys):
    from test_cli import MEMO, run, write_data
    data = write_data(tmp_path / "d.json", MEMO)  # every alpaca prompt here is over 30 tokens
    code, _, err = run(capsys, "train", "--model", small_base(tmp_path), "--data", data, "--out", tmp_path / "run",
                       "--epochs", 1, "--batch-size", 2, "--max-length", 20, "--eval-every", 1)
    assert code == 0, err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["tokens"] for m in metrics] == [40, 80, 120, 160]  # 2 rows of 20 kept tokens a step


def test_the_whole_validation_set_is_measured_after_each_epoch_and_kept_apart_from_the_curve(tmp_path, capsys,
                                                                                              monkeypatch):
    from test_cli import MEMO, run, write_data
    monkeypatch.setattr(sft, "CURVE_ROWS", 2)
    data = write_data(tmp_path / "d.json", [MEMO[i % 10] for i in range(60)])  # 51 train, 6 test, 3 validation
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", small_base(tmp_path), "--data", data, "--out", out, "--epochs", 1,
                       "--batch-size", 2, "--eval-every", 10, "--precision", "fp32")
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["val_rows"] for m in metrics} == {2}
    model = gpt.from_pretrained(str(out))
    rows = sft.InstructionDataset(sft.split(sft.load_entries(data))[1], sft.tokenizer())
    every_row = sft.calc_loss_loader(DataLoader(rows, batch_size=3, collate_fn=sft.collate), model, "cpu")
    settings = json.loads((out / "run.json").read_text())
    assert settings["val_rows"] == 3 and settings["val_loss"] == pytest.approx(every_row, rel=1e-5)
    assert f"validation loss {every_row:.3f} on all 3 rows" in err


def products_summed_over(model, inputs, targets):
    """(aten op, the length it sums over) of every matrix product in a training step's forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "bmm", "addmm", "baddbmm", "addbmm"):
                left = args[0] if name in ("mm", "bmm") else args[1]
                self.seen.append((name, left.shape[-1]))
            return func(*args, **(kwargs or {}))
    with Products() as products:
        sft.calc_loss_batch(inputs, targets, model, "cpu").backward()
    return products.seen


def test_no_batched_matmul_of_a_training_step_sums_over_32767_terms_or_more():
    """torch 2.14 routes only 2-D products summing over 32,767 or more around the M1/M2 MPS kernel that reads past its
    inputs (pytorch#183535); batched ones (bmm, baddbmm) stay wrong there (pytorch#195163): none may be one."""
    model = tiny_model(seed=1, vocab=50257)
    inputs, targets = sft.collate([[5, 9, 14, 3, 7], [8, 2]])
    seen = products_summed_over(model, inputs, targets)
    assert ("mm", 50257) in seen  # the tied head's input gradient sums over the vocabulary: a 2-D mm
    assert not [(op, n) for op, n in seen if op in ("bmm", "baddbmm", "addbmm") and n >= 32767]
