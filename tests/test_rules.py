"""Rules that the other tests left unpinned: each test here fails when its bug is planted (issue 10, item 7)."""
import json, os, struct

import pytest
import torch
import torch.nn.functional as F

import gpt
import sft
from conftest import FIXTURE, tiny_model

CPU = torch.device("cpu")
ROWS = [([5, 9, 14, 3, 7, 1], 2), ([8, 2], 1), ([4, 4, 6, 11, 30, 2, 9, 9, 1, 3], 7), ([7, 3, 5], 1)]


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
    micro = [sft.collate(ROWS[:1]), sft.collate(ROWS[1:])]  # 6 targets, then 2 + 10 + 3
    loss, count = sft.loss_and_backward(model, micro, CPU)
    assert count == 21 and (loss / count).item() == pytest.approx(reference_mean_loss(model, ROWS), rel=1e-5)
    got = model.h[0].mlp.c_fc.weight.grad.clone()
    model.zero_grad()
    inputs, targets = sft.collate(ROWS)
    F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=sft.IGNORE).backward()
    assert torch.allclose(got, model.h[0].mlp.c_fc.weight.grad, atol=1e-6)


def test_validation_loss_is_token_weighted_not_a_mean_of_batch_means():
    model = tiny_model(seed=8, vocab=50257)
    cfg = sft.TrainConfig(model="tiny", batch_size=3, mask_prompt=True)  # batches of 5 + 2 + 4 targets, then 3
    assert sft.mean_loss(model, ROWS, cfg, CPU) == pytest.approx(reference_mean_loss(model, ROWS, True), rel=1e-5)


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
    got = gpt.generate(model, [prompt], 10)
    assert len(got[0]) == 1  # 63 prompt tokens + 1 new fill the context
    with torch.no_grad():
        expected = int(model(torch.tensor([prompt[-63:]]))[0, -1].argmax())
    assert got[0] == [expected]
    assert len(gpt.generate(model, [prompt[:60]], 10)[0]) == 4  # 60 + 4 = 64


def test_the_split_truncates_fractions_as_the_book_does():
    entries = [{"instruction": str(i), "output": ""} for i in range(30)]  # 0.85 x 30 = 25.5: int 25, round 26
    train, val, test = sft.split(entries)
    assert (len(train), len(val), len(test)) == (25, 2, 3)
