"""The chapter's exercises as flags: LoRA (7.4), gradient accumulation (7.3); style and masking (7.1, 7.2) are in test_cli."""
import json, math
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

import gpt
import sft
from conftest import tiny_model
from test_cli import MEMO, run, write_data


def test_lora_starts_at_the_base_model_trains_only_adapters_and_merges_exactly(tmp_path):
    model, ids = tiny_model(seed=4), torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        base = model(ids)
    gpt.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # B starts at zero
    sft.calc_loss_batch(ids, ids, model, "cpu").backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.endswith((".A", ".B")) for n in trained)
    assert len(trained) == 2 * 4 * 2  # A and B on c_attn, attn.c_proj, c_fc, mlp.c_proj of 2 blocks
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_()  # as if trained
        adapted = model(ids)
    gpt.merge_lora(model)
    with torch.no_grad():
        assert (model(ids) - adapted).abs().max() < 1e-5
    gpt.save_pretrained(model, tmp_path)
    saved, fresh = gpt.read_safetensors(tmp_path / "model.safetensors"), tiny_model(seed=4)
    assert not any(k.endswith((".A", ".B")) or ".base." in k for k in saved)
    for k in ("wte.weight", "wpe.weight", "ln_f.weight", "h.0.ln_1.bias", "h.1.ln_2.weight"):
        assert torch.equal(saved[k], fresh.state_dict()[k])


def test_the_tools_training_step_runs_the_chapters_calc_loss_batch_and_skips_a_micro_batch_without_targets(monkeypatch):
    seen = []
    chapters = sft.calc_loss_batch
    def doubled(input_batch, target_batch, model, device):  # a student's change to the chapter's loss
        seen.append(input_batch.shape[0])
        return 2 * chapters(input_batch, target_batch, model, device)
    monkeypatch.setattr(sft, "calc_loss_batch", doubled)
    rows = [(1, [5, 9, 14, 3]), (2, [8, 2, 7])]
    collate = partial(sft.custom_collate_fn, pad_token_id=0)  # the tiny model's vocabulary is 512
    no_target = collate([(4, [5, 9, 14, 3])], allowed_max_length=3)  # cut before its response
    assert (no_target[1] == -100).all()
    model = tiny_model(seed=5)
    inputs, targets = collate(rows)
    summed, count = sft.loss_and_backward(model, [(inputs, targets), no_target], "cpu")
    assert seen == [2] and count == 6  # the micro-batch without a target is never measured: no NaN
    plain = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    assert torch.allclose(summed, 2 * plain.detach())  # the change reached training
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_accumulation_equals_one_batch_of_all_the_rows():
    g = torch.Generator().manual_seed(0)
    rows = [(p, torch.randint(0, 512, (n,), generator=g).tolist()) for n, p in ((3, 1), (9, 4), (5, 5), (12, 2), (2, 1))]
    def grads(parts):
        model = tiny_model(seed=5)
        loss, n = sft.loss_and_backward(model, [sft.custom_collate_fn(part, pad_token_id=0) for part in parts], "cpu")
        return loss / n, [p.grad.clone() for p in model.parameters()]
    whole_loss, whole = grads([rows])
    split_loss, split = grads([rows[:2], rows[2:3], rows[3:]])  # micro-batches with 10, 1 and 11 target tokens
    assert torch.allclose(whole_loss, split_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, split))


def test_fit_with_accumulation_trains_as_one_batch_of_all_the_rows():
    """grad_accum k of batch b: the same gradients, losses and weights as grad_accum 1 of batch k * b, the rows the
    same (token-weighted: MEMO's rows differ in length, so a mean of micro-batch means would differ)."""
    def trained(batch_size, grad_accum):
        model = tiny_model(seed=5, vocab=50257)
        train_loader, val_loader = memo_loaders(batch_size)
        grads, reports = [], []

        class Watched(torch.optim.SGD):  # plain SGD: the weights move by the gradients alone, rounding stays small
            def step(self):
                grads.append([p.grad.clone() for p in model.parameters()])
                return super().step()
        cfg = sft.TrainConfig(model="tiny", epochs=2, eval_every=1, lr=0.5, grad_accum=grad_accum)
        sft.fit(model, Watched(model.parameters(), lr=0.5), train_loader, val_loader, "cpu", cfg, 1,
                lambda epoch, done: reports.extend(done[len(reports):]))
        return grads, reports, [p.detach() for p in model.parameters()]
    whole_grads, whole_reports, whole = trained(4, 1)
    assert len(whole_grads) == len(whole_reports) == 4  # 8 rows, 4 a step, 2 epochs
    for batch_size, grad_accum in ((2, 2), (1, 4)):
        grads, reports, weights = trained(batch_size, grad_accum)
        assert len(grads) == 4
        assert all(torch.allclose(a, b, atol=1e-6) for step, whole_step in zip(grads, whole_grads)
                   for a, b in zip(step, whole_step))
        assert [r["train_loss"] for r in reports] == pytest.approx([r["train_loss"] for r in whole_reports], rel=1e-5)
        assert [r["val_loss"] for r in reports] == pytest.approx([r["val_loss"] for r in whole_reports], rel=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(weights, whole))
    assert not torch.allclose(whole[0], tiny_model(seed=5, vocab=50257).wte.weight, atol=1e-3)  # it did train


def test_lora_run_saves_a_plain_checkpoint_in_a_whole_hugging_face_folder_and_reports_trainable_parameters(tmp_path, capsys):
    data, out = write_data(tmp_path / "d.json", MEMO), tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", out, "--epochs", 1, "--batch-size", 2,
                       "--lora-rank", 8, "--grad-accum", 2)
    assert code == 0, err
    assert "lr 0.001, effective batch 4 (2 x 2), 2 steps" in err  # 8 rows // 4
    # 4 blocks x rank 8 x (in + out) of c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert f"{4 * 8 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128)):,} trainable parameters" in err
    saved = gpt.read_safetensors(out / "model.safetensors")
    assert set(saved) == set(sft.load_model("tiny").state_dict())  # no adapter tensors, every base tensor
    assert gpt.from_pretrained(str(out)).config.n_embd == 128
    assert_a_whole_hugging_face_folder(out, tmp_path / "tiktoken-cache")


def assert_a_whole_hugging_face_folder(out, cache):
    """config.json names the context and end-of-text, and tiktoken built from the folder's own vocab.json and
    merges.txt encodes the book's 1,100 entries exactly as sft.load_tokenizer() does."""
    import os
    import tiktoken.load
    from conftest import DATA
    config = json.loads((out / "config.json").read_text())
    assert (config["n_ctx"], config["bos_token_id"], config["eos_token_id"]) == (config["n_positions"], 50256, 50256)
    reference = sft.load_tokenizer()
    before = os.environ["TIKTOKEN_CACHE_DIR"]
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # tiktoken caches what it reads: never into data/
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(out / "merges.txt"), str(out / "vocab.json"))
    finally:
        os.environ["TIKTOKEN_CACHE_DIR"] = before
    from_folder = tiktoken.Encoding("gpt2-from-the-run-folder", pat_str=reference._pat_str, mergeable_ranks=ranks,
                                    special_tokens={"<|endoftext|>": 50256})
    entries = json.loads(DATA.read_text())
    assert len(entries) == 1100 and from_folder.n_vocab == reference.n_vocab == 50257
    ours = sft.InstructionDataset(entries, reference, mask_prompt=True)
    theirs = sft.InstructionDataset(entries, from_folder, mask_prompt=True)
    assert list(theirs) == list(ours)


def block_input(model, ids):
    """What block 0 receives: token plus position embeddings, (B, T, C)."""
    seen = []
    hook = model.h[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return seen[0]


def test_neftune_noise_is_uniform_within_alpha_over_sqrt_length_times_width_while_training_only():
    model = tiny_model(seed=6)  # width 32
    ids = torch.randint(0, 512, (4, 50))
    clean = block_input(model.eval(), ids)
    with torch.no_grad():
        plain = model(ids)
    gpt.add_neftune(model, alpha=5.0)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), plain)  # eval mode: exactly the model without it
    torch.manual_seed(0)
    noise = block_input(model.train(), ids) - clean
    bound = 5.0 / (50 * 32) ** 0.5
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert abs(noise.abs().mean() / bound - 0.5) < 0.02  # uniform in [-b, b]: mean size b / 2
    off = tiny_model(seed=6)
    gpt.add_neftune(off, alpha=0.0)
    with torch.no_grad():
        assert torch.equal(off.train()(ids), plain)  # alpha 0: no noise even while training


def test_a_neftune_run_keeps_its_alpha_in_run_json(tmp_path, capsys):
    data, out = write_data(tmp_path / "d.json", MEMO), tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", out, "--epochs", 1, "--batch-size", 2,
                       "--neftune-alpha", 5)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["neftune_alpha"] == 5


# ---------------------------------------------------------------- the learning-rate schedule and clipping
def transformers_lr(k, lr, warmup, steps, cosine):
    """The learning rate of update k (1 .. steps), by get_(constant|cosine)_schedule_with_warmup's formula (written
    anew here: sft counts steps from 0, as the book's global_step)."""
    s = k - 1
    if s < warmup:
        return lr * s / warmup
    if not cosine:
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_follows_warmup_then_the_schedule_as_transformers(schedule):
    cosine = schedule == "cosine"
    for k in (1, 2, 10, 11, 12, 55, 99, 100):  # the first step (0), the warmup's last, the decay's middle, the last
        assert 1e-3 * sft.lr_factor(k - 1, 100, 10, cosine) == pytest.approx(transformers_lr(k, 1e-3, 10, 100, cosine),
                                                                             abs=1e-15)
    assert sft.lr_factor(0, 100, 10, cosine) == 0 and sft.lr_factor(10, 100, 10, cosine) == 1
    assert sft.lr_factor(99, 100, 10, cosine) == pytest.approx(1.0 if not cosine else 3.046e-4, abs=1e-7)  # just above 0


def memo_loaders(batch_size=2, train_rows=8):
    """MEMO's first train_rows rows in order, then the rest for validation, as the tool's alpaca id lists."""
    rows = list(sft.InstructionDataset([{"instruction": i, "input": x, "output": o} for i, x, o in MEMO], sft.load_tokenizer()))
    return (DataLoader(rows[:train_rows], batch_size=batch_size, collate_fn=sft.custom_collate_fn),
            DataLoader(rows[train_rows:], batch_size=2, collate_fn=sft.custom_collate_fn))


def steps_seen(monkeypatch, **settings):
    """A tiny run of the tool's loop, sft.fit: each step's gradients as backward left them, as the optimizer saw them,
    and its lr, with one report a step."""
    model = tiny_model(seed=3, vocab=50257)
    train_loader, val_loader = memo_loaders()
    raw, seen, lrs, reports = [], [], [], []

    def backward(model, micro_batches, *args):
        result = TRAINING_STEP(model, micro_batches, *args)
        raw.append([p.grad.clone() for p in model.parameters()])
        return result

    class Watched(torch.optim.AdamW):
        def step(self):
            seen.append([p.grad.clone() for p in model.parameters()])
            lrs.append(self.param_groups[0]["lr"])
            return super().step()
    monkeypatch.setattr(sft, "loss_and_backward", backward)
    optimizer = Watched(model.parameters(), lr=1e-3)
    cfg = sft.TrainConfig(model="tiny", epochs=1, eval_every=1, lr=1e-3, **settings)
    sft.fit(model, optimizer, train_loader, val_loader, "cpu", cfg, 1, lambda epoch, done: reports.extend(done))
    assert len(lrs) == 4 and [m["lr"] for m in reports] == lrs  # each report names the rate its step used
    return raw, seen, lrs


TRAINING_STEP = sft.loss_and_backward


def global_norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_clipping_bounds_the_gradients_norm_and_keeps_its_direction(monkeypatch):
    raw, seen, _ = steps_seen(monkeypatch, max_grad_norm=0.5)
    assert all(global_norm(r) > 0.5 for r in raw)  # so every step was clipped
    for before, after in zip(raw, seen):
        assert global_norm(after) <= 0.5 * (1 + 1e-5)
        scale = global_norm(after) / global_norm(before)
        assert all(torch.allclose(a, b * scale, atol=1e-7) for a, b in zip(after, before))  # the same direction


def test_each_update_uses_the_scheduled_rate(monkeypatch):
    _, _, lrs = steps_seen(monkeypatch, warmup_steps=2, schedule="cosine")
    assert lrs == pytest.approx([transformers_lr(k, 1e-3, 2, 4, True) for k in range(1, 5)], abs=1e-15)
    assert lrs[0] == 0 and lrs[2] == 1e-3


def test_with_every_default_the_rate_is_lr_and_the_gradients_untouched(monkeypatch):
    raw, seen, lrs = steps_seen(monkeypatch)
    assert lrs == [1e-3] * 4
    assert all(torch.equal(a, b) for r, s in zip(raw, seen) for a, b in zip(r, s))


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_a_report_holds_its_own_steps_loss_over_their_targets_and_the_norm_before_clipping(monkeypatch, capsys,
                                                                                          max_grad_norm):
    model = tiny_model(seed=3, vocab=50257)
    train_loader, val_loader = memo_loaders()
    results, raw, reports = [], [], []

    def backward(model, micro_batches, *args):
        summed, count = TRAINING_STEP(model, micro_batches, *args)
        results.append((summed.item(), count))
        raw.append(global_norm([p.grad for p in model.parameters()]))
        return summed, count
    monkeypatch.setattr(sft, "loss_and_backward", backward)
    cfg = sft.TrainConfig(model="tiny", epochs=1, eval_every=3, lr=1e-3, max_grad_norm=max_grad_norm)
    sft.fit(model, torch.optim.AdamW(model.parameters(), lr=1e-3), train_loader, val_loader, "cpu", cfg, 1,
            lambda epoch, done: reports.extend(done))
    assert [r["step"] for r in reports] == [0, 3]  # 4 steps; a report every 3
    for report, steps in zip(reports, ([0], [1, 2, 3])):  # the steps since the last report, weighted by their targets
        summed, count = (sum(results[s][i] for s in steps) for i in (0, 1))
        assert report["train_loss"] == pytest.approx(summed / count, rel=1e-6)
        assert report["grad_norm"] == pytest.approx(raw[steps[-1]], rel=1e-5)  # the report step's, before any clipping
    assert reports[1]["train_loss"] != pytest.approx(sum(results[s][0] / results[s][1] for s in (1, 2, 3)) / 3, rel=1e-6)
    err = capsys.readouterr().err
    for r in reports:
        assert (f"epoch 1, step {r['step']}: train loss {r['train_loss']:.3f} (its steps since the last report), "
                f"validation loss {r['val_loss']:.3f}\n") in err


def test_a_warmup_and_cosine_run_reports_its_rates_and_norms_and_keeps_its_settings(tmp_path, capsys):
    data, out = write_data(tmp_path / "d.json", MEMO), tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", out, "--epochs", 2, "--batch-size", 2,
                       "--eval-every", 1, "--warmup-steps", 3, "--schedule", "cosine", "--max-grad-norm", 1)
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == pytest.approx([transformers_lr(k, 1e-3, 3, 8, True) for k in range(1, 9)])
    assert all(m["grad_norm"] > 0 for m in metrics)
    settings = json.loads((out / "run.json").read_text())
    assert (settings["warmup_steps"], settings["schedule"], settings["max_grad_norm"]) == (3, "cosine", 1)


def neftune_phases(monkeypatch, capsys, tmp_path):
    """A tiny NEFTune run: for each forward through wte, the phase it ran in and whether its output was noisy."""
    forwards = []
    phase = ["other"]
    add, step, measure = gpt.add_neftune, sft.loss_and_backward, sft.calc_loss_loader

    def add_and_watch(model, alpha):
        add(model, alpha)
        def watch(wte, inputs, embeddings):  # runs after NEFTune's hook and sees what it returned
            forwards.append((phase[0], not torch.equal(embeddings, wte.weight[inputs[0]])))
        model.wte.register_forward_hook(watch)

    def in_phase(name, fn):
        def wrapped(*args):
            phase[0] = name
            try:
                return fn(*args)
            finally:
                phase[0] = "other"
        return wrapped
    monkeypatch.setattr(gpt, "add_neftune", add_and_watch)
    monkeypatch.setattr(sft, "loss_and_backward", in_phase("step", step))
    monkeypatch.setattr(sft, "calc_loss_loader", in_phase("validation", measure))
    data, out = write_data(tmp_path / "d.json", MEMO), tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", out, "--epochs", 1, "--batch-size", 2,
                       "--eval-every", 1, "--neftune-alpha", 5)
    assert code == 0, err
    return forwards


def test_neftune_noise_is_on_at_every_training_step_of_a_run(monkeypatch, capsys, tmp_path):
    steps = [noisy for phase, noisy in neftune_phases(monkeypatch, capsys, tmp_path) if phase == "step"]
    assert len(steps) == 4 and all(steps)  # 8 training rows, 2 a step: each step's forward is noisy


def test_validation_is_measured_without_neftune_noise_at_every_report(monkeypatch, capsys, tmp_path):
    measured = [noisy for phase, noisy in neftune_phases(monkeypatch, capsys, tmp_path) if phase == "validation"]
    assert len(measured) == 5 and not any(measured)  # a report a step, then the whole set after the epoch
