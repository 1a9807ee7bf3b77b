"""Rules that the other tests left unpinned: each test here was seen to fail with its bug planted by hand."""
import json, math, os, struct
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import gpt
import sft
from conftest import FIXTURE, tiny_model

CPU = torch.device("cpu")
IGNORE = -100  # the book's ignore_index, cross_entropy's default
ROWS = [([5, 9, 14, 3, 7, 1], 2), ([8, 2], 1), ([4, 4, 6, 11, 30, 2, 9, 9, 1, 3], 7), ([7, 3, 5], 1)]
PLAIN = [ids for ids, _ in ROWS]  # the book's dataset items
MASKED = [(prompt_len, ids) for ids, prompt_len in ROWS]  # exercise 7.2's


def reference_mean_loss(model, rows, mask_prompt=False):
    """Cross-entropy averaged over every target token of all rows at once, without collate or batching."""
    logits, targets = [], []
    for ids, prompt_len in rows:
        with torch.no_grad():
            logits.append(model(torch.tensor([ids]))[0])
        target = ids[1:] + [gpt.EOT]
        if mask_prompt:
            target = [IGNORE] * (prompt_len - 1) + target[prompt_len - 1:]
        targets.append(torch.tensor(target))
    return F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=IGNORE).item()


def test_the_step_loss_is_the_mean_over_target_tokens_and_its_gradient_matches():
    model = tiny_model(seed=7, vocab=50257)
    micro = [sft.custom_collate_fn(PLAIN[:1]), sft.custom_collate_fn(PLAIN[1:])]  # 6 targets, then 2 + 10 + 3
    loss, count = sft.loss_and_backward(model, micro, CPU)
    assert count == 21 and (loss / count).item() == pytest.approx(reference_mean_loss(model, ROWS), rel=1e-5)
    got = model.h[0].mlp.c_fc.weight.grad.clone()
    model.zero_grad()
    inputs, targets = sft.custom_collate_fn(PLAIN)
    F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
    assert torch.allclose(got, model.h[0].mlp.c_fc.weight.grad, atol=1e-6)


def test_validation_loss_is_the_books_mean_of_batch_means_not_token_weighted():
    model = tiny_model(seed=8, vocab=50257)
    loader = DataLoader(MASKED, batch_size=3, collate_fn=sft.custom_collate_fn)  # batches of 5 + 2 + 4 targets, then 3
    first, second = reference_mean_loss(model, ROWS[:3], True), reference_mean_loss(model, ROWS[3:], True)
    assert sft.calc_loss_loader(loader, model, "cpu") == pytest.approx((first + second) / 2, rel=1e-5)
    token_weighted = reference_mean_loss(model, ROWS, True)
    assert abs((first + second) / 2 - token_weighted) > 1e-3  # so the two rules are told apart here
    assert sft.calc_loss_loader(loader, model, "cpu", num_batches=1) == pytest.approx(first, rel=1e-5)
    assert sft.calc_loss_loader(loader, model, "cpu", num_batches=5) == pytest.approx((first + second) / 2, rel=1e-5)
    assert math.isnan(sft.calc_loss_loader(DataLoader([], batch_size=3, collate_fn=sft.custom_collate_fn), model, "cpu"))
    no_target = DataLoader([(10, [5, 9, 14, 3, 7])], collate_fn=partial(sft.custom_collate_fn, allowed_max_length=4))
    assert math.isnan(sft.calc_loss_loader(no_target, model, "cpu"))  # cut before the response: no target, NaN


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
    train, test, val = sft.split(entries)
    assert (len(train), len(test), len(val)) == (25, 3, 2)


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
        rows = [inputs[i, inputs[i] != gpt.EOT] for inputs, _ in micro_batches for i in range(len(inputs))]
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


def prompts_answered(monkeypatch, reply=()):
    """Patches gpt.generate_batch to record the prompt ids it is given (and answer reply's ids, none by default)."""
    seen = []

    def recording(model, prompts, max_new_tokens, **options):
        seen.extend(prompts)
        return [list(reply) for _ in prompts]
    monkeypatch.setattr(gpt, "generate_batch", recording)
    return seen


def test_an_answers_prompt_is_plain_text_as_in_training(monkeypatch):
    enc = sft.load_tokenizer()
    entry = {"instruction": "Repeat <|endoftext|> twice.", "input": "a <|endoftext|> b", "output": ""}
    seen = prompts_answered(monkeypatch, reply=enc.encode_ordinary("\n\n### Response:\nRed. "))
    assert sft.answer(tiny_model(), [entry], enc) == ["Red."]  # the model's own marker taken out, then stripped
    prompt_len, ids = sft.InstructionDataset([entry], enc, mask_prompt=True)[0]
    assert seen == [ids[:prompt_len]] == [enc.encode_ordinary(sft.format_input(entry))]  # the book's: no marker
    assert gpt.EOT not in seen[0]  # the written <|endoftext|> is characters, not the special token


def test_generate_answers_in_the_runs_own_prompt_style(tmp_path, capsys, monkeypatch):
    from test_cli import MEMO, fake_run, run
    out = fake_run(tmp_path, MEMO, style="phi3")
    written = sft.load_tokenizer().encode_ordinary("\n<|assistant|>:\nBlue.")  # the model writes the marker itself
    seen = prompts_answered(monkeypatch, reply=written)
    code, stdout, err = run(capsys, "generate", "--out", out, "Name a color.", "--input", "bright")
    assert code == 0, err
    assert sft.load_tokenizer().decode(seen[0]) == "<|user|>\nName a color.\nbright"  # the book's prompt: no marker
    assert stdout == "Blue.\n"  # exercise 7.1's marker, with its colon, taken out of the answer


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


def books_validation_loss(model, rows, batch_size, num_batches=None):
    """The book's calc_loss_loader written anew: the mean over the first num_batches batches of each batch's mean."""
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)][:num_batches]
    return sum(reference_mean_loss(model, batch) for batch in batches) / len(batches)


def test_the_curve_is_the_books_loss_of_the_first_8_rows_and_the_whole_set_is_measured_after_each_epoch(
        tmp_path, capsys, monkeypatch):
    from test_cli import MEMO, run, write_data
    data = write_data(tmp_path / "d.json", [MEMO[i % 10] for i in range(180)])  # 153 train, 18 test, 9 validation
    out = tmp_path / "run"
    weights, step = {}, torch.optim.AdamW.step

    def recording(optimizer, *args, **kwargs):  # the weights after each reported step (0, 20), as validated
        result = step(optimizer, *args, **kwargs)
        done = len(weights.setdefault("steps", []))
        weights["steps"].append(done)
        if done % 20 == 0:
            weights[done] = {n: p.detach().clone() for n, p in loaded[0].state_dict().items()}
        return result
    loaded, load = [], sft.load_model
    monkeypatch.setattr(sft, "load_model", lambda *args: loaded.append(load(*args)) or loaded[-1])
    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    code, _, err = run(capsys, "train", "--model", small_base(tmp_path), "--data", data, "--out", out, "--epochs", 1,
                       "--batch-size", 4, "--eval-every", 20, "--lr", 3e-3, "--precision", "fp32")
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 20] and {m["val_rows"] for m in metrics} == {8}
    rows = [(ids, 1) for ids in sft.InstructionDataset(sft.split(sft.load_entries(data))[2], sft.load_tokenizer())]
    model = gpt.from_pretrained(str(out))
    for m in metrics:  # ceil(8 / 4) = 2 batches of the same 8 rows each time, the book's mean of their two means
        model.load_state_dict(weights[m["step"]])
        assert m["val_loss"] == pytest.approx(books_validation_loss(model, rows, 4, num_batches=2), rel=1e-5)
    model = gpt.from_pretrained(str(out))
    every_row = books_validation_loss(model, rows, 4)  # batches of 4, 4 and 1 rows
    settings = json.loads((out / "run.json").read_text())
    assert settings["val_rows"] == 9 and settings["val_loss"] == pytest.approx(every_row, rel=1e-5)
    assert f"validation loss {every_row:.3f} on all 9 rows" in err
    assert every_row != pytest.approx(reference_mean_loss(model, rows), rel=1e-3)  # not the token-weighted mean


def test_the_books_loop_steps_each_batch_from_fresh_gradients_and_measures_eval_iter_batches_every_eval_freq_steps(
        capsys):
    """train_model_simple against the loop written anew: zero_grad before each batch's backward, then every eval_freq
    steps the mean of the first eval_iter batches' losses of each loader; tokens seen count padding; after each epoch
    a greedy 50-token sample after start_context, on one line."""
    enc = sft.load_tokenizer()
    from test_cli import MEMO
    rows = list(sft.InstructionDataset([{"instruction": i, "input": x, "output": o} for i, x, o in MEMO], enc))
    train_loader = DataLoader(rows[:8], batch_size=2, collate_fn=sft.custom_collate_fn)
    val_loader = DataLoader(rows[6:], batch_size=2, collate_fn=sft.custom_collate_fn)

    def measured(model, loader, n):
        with torch.no_grad():
            losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in list(loader)[:n]]
        return sum(losses) / len(losses)
    model = tiny_model(seed=4, vocab=50257)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected, seen, samples = ([], [], []), 0, []
    context = torch.tensor([enc.encode_ordinary("Say yes.")])
    for epoch in range(2):
        for step, (x, y) in enumerate(train_loader):
            optimizer.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            optimizer.step()
            seen += x.numel()
            if (epoch * 4 + step) % 3 == 0:
                for curve, value in zip(expected, (measured(model, train_loader, 2), measured(model, val_loader, 2), seen)):
                    curve.append(value)
        samples.append(enc.decode(gpt.generate(model, context, 50, 64)[0].tolist()).replace("\n", " "))
    model_weights = model.wte.weight.detach().clone()

    model = tiny_model(seed=4, vocab=50257)
    got = sft.train_model_simple(model, train_loader, val_loader, torch.optim.SGD(model.parameters(), lr=0.5), "cpu",
                                 num_epochs=2, eval_freq=3, eval_iter=2, start_context="Say yes.", tokenizer=enc)
    assert got[2] == expected[2]  # padding included
    assert got[0] == pytest.approx(expected[0], rel=1e-5) and got[1] == pytest.approx(expected[1], rel=1e-5)
    assert torch.allclose(model.wte.weight, model_weights, atol=1e-6)
    steps = [f"Ep {e} (Step {s:06d}): Train loss {t:.3f}, Val loss {v:.3f}" for e, s, t, v in
             zip((1, 1, 2), (0, 3, 6), got[0], got[1])]
    assert capsys.readouterr().out.splitlines() == steps[:2] + samples[:1] + steps[2:] + samples[1:]
    assert all(len(enc.encode_ordinary(s)) > 8 for s in samples)  # "Say yes." and what followed


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
    inputs, targets = sft.custom_collate_fn([[5, 9, 14, 3, 7], [8, 2]])
    seen = products_summed_over(model, inputs, targets)
    assert ("mm", 50257) in seen  # the tied head's input gradient sums over the vocabulary: a 2-D mm
    assert not [(op, n) for op, n in seen if op in ("bmm", "baddbmm", "addbmm") and n >= 32767]
