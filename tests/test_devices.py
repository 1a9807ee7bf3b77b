"""Devices and precision: each machine a student has gets its fastest correct precision (torch patched: no GPU needed)."""
import json

import pytest
import torch

import gpt
import sft
from conftest import tiny_model
from test_cli import MEMO, run, write_data


@pytest.mark.parametrize("capability, bf16", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)])
def test_cuda_trains_in_bf16_from_ampere_on_and_in_fp32_before(monkeypatch, capability, bf16):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert sft.native_bf16(torch.device("cuda")) is bf16  # a T4 is (7, 5): its bf16 would be emulated


@pytest.mark.parametrize("avx512_bf16, amx, bf16", [(True, False, True), (False, True, True), (False, False, False)])
def test_a_cpu_trains_in_bf16_only_where_it_computes_bf16_natively(monkeypatch, avx512_bf16, amx, bf16):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert sft.native_bf16(torch.device("cpu")) is bf16


def test_mps_trains_in_fp32():
    assert sft.native_bf16(torch.device("mps")) is False


@pytest.mark.parametrize("cuda, mps, version, picked", [
    (True, True, "2.14.0", "cuda"), (False, True, "2.14.0", "mps"), (False, True, "2.15.1", "mps"),
    (False, True, "2.13.0", "cpu"), (False, False, "2.14.0", "cpu")])
def test_auto_picks_cuda_then_mps_on_a_torch_that_computes_it_right_then_cpu(monkeypatch, cuda, mps, version, picked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: None)  # as if this machine had each device
    assert sft.pick_device("auto") == torch.device(picked)


@pytest.mark.parametrize("version", ["2.13.0", "2.13.1+cpu", "2.9.1"])
def test_mps_on_a_torch_older_than_2_14_is_one_line_naming_the_fix(tmp_path, capsys, monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    data = write_data(tmp_path / "d.json", MEMO)
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", tmp_path / "run", "--device", "mps")
    assert code == f"error: --device mps needs torch 2.14 or newer, not {version} (its gradients are wrong on M1/M2): " \
                   "pip install -U 'torch>=2.14'"
    assert "step 0" not in err


def test_a_newer_torch_gets_past_the_mps_check_to_the_devices_own():
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "__version__", "2.14.0")
        m.setattr(torch, "empty", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no MPS here")))
        with pytest.raises(ValueError, match="--device mps is not available here"):
            sft.pick_device("mps")


def test_an_mps_out_of_memory_runtime_error_is_the_out_of_memory_line(tmp_path, capsys, monkeypatch):
    def no_memory(*args):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 17.02 GB, other allocations: 1.20 GB)")
    monkeypatch.setattr(sft, "loss_and_backward", no_memory)
    data = write_data(tmp_path / "d.json", MEMO)
    code, _, _ = run(capsys, "train", "--model", "tiny", "--data", data, "--out", tmp_path / "run")
    assert code == "error: out of memory: lower --batch-size (raise --grad-accum to keep the batch)"


def test_another_runtime_error_is_not_called_out_of_memory():
    def broken():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        sft.run_cli(broken)


def attention_dtypes(model):
    """The dtype of every c_attn output, in the order the forwards ran."""
    seen = []
    model.h[0].attn.c_attn.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def test_bf16_autocasts_the_training_steps_forwards_only_and_keeps_the_weights_and_the_loss_fp32():
    model = tiny_model(seed=2)
    seen = attention_dtypes(model)
    batch = sft.custom_collate_fn([(2, [5, 9, 14, 3]), (1, [8, 2])], pad_token_id=0)
    fp32 = sft.calc_loss_batch(*batch, model, "cpu")  # a string device, as the book passes it
    summed, count = sft.loss_and_backward(model, [batch], "cpu", bf16=True)  # a training step
    measured = sft.calc_loss_loader([batch], model, "cpu")  # validation's, outside the step
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    assert summed.dtype == torch.float32 and measured == fp32.item()
    assert (summed / count).item() == pytest.approx(fp32.item(), rel=0.02) and (summed / count).item() != fp32.item()
    assert {p.dtype for p in model.parameters()} | {p.grad.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("native, flag, precision", [(True, [], "bf16"), (False, [], "fp32"), (True, ["--precision", "fp32"], "fp32")])
def test_a_run_trains_in_the_precision_chosen_and_says_which(tmp_path, capsys, monkeypatch, native, flag, precision):
    monkeypatch.setattr(sft, "native_bf16", lambda device: native)
    watched = []
    load = sft.load_model

    def load_and_watch(*args):
        model = load(*args)
        watched.append(attention_dtypes(model))  # a list the hook fills as the run goes
        return model
    monkeypatch.setattr(sft, "load_model", load_and_watch)
    data = write_data(tmp_path / "d.json", MEMO)
    base = tmp_path / "base"  # small: emulated bf16 is slow on a CPU without it
    gpt.save_pretrained(tiny_model(vocab=50257, n_positions=256), base)
    code, _, err = run(capsys, "train", "--model", base, "--data", data, "--out", tmp_path / "run", "--epochs", 1,
                       "--batch-size", 4, *flag)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["precision"] == precision
    assert f"on cpu in {precision}," in err
    dtypes = watched[0]
    assert (torch.bfloat16 in dtypes) == (precision == "bf16") and len(dtypes) > 10
    assert dtypes[-1] == torch.float32  # the sample answer is generated in fp32 whatever the training precision
