"""The chapter's exercises as flags: LoRA (7.4), gradient accumulation (7.3); style and masking (7.1, 7.2) are in test_cli."""
import json

import torch

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
    sft.loss_sum(model, ids, ids, torch.device("cpu")).backward()
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


def test_gradient_accumulation_equals_one_batch_of_all_the_rows():
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(0, 512, (n,), generator=g).tolist(), p) for n, p in ((3, 1), (9, 4), (5, 5), (12, 2), (2, 1))]
    def grads(parts):
        model = tiny_model(seed=5)
        loss, n = sft.loss_and_backward(model, [sft.collate(part, pad_id=0, mask_prompt=True) for part in parts], torch.device("cpu"))
        return loss / n, [p.grad.clone() for p in model.parameters()]
    whole_loss, whole = grads([rows])
    split_loss, split = grads([rows[:2], rows[2:3], rows[3:]])  # micro-batches with 10, 1 and 11 target tokens
    assert torch.allclose(whole_loss, split_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, split))


def test_lora_run_saves_a_plain_checkpoint_in_a_whole_hugging_face_folder_and_reports_trainable_parameters(tmp_path, capsys):
    data, out = write_data(tmp_path / "d.json", MEMO), tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", out, "--epochs", 1, "--batch-size", 2,
                       "--lora-rank", 8, "--grad-accum", 2)
    assert code == 0, err
    assert "trainable of" in err and "lr 0.001, effective batch 4 (2 x 2), 2 steps" in err  # 8 rows // 4
    # 4 blocks x rank 8 x (in + out) of c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert f"{4 * 8 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128)):,} trainable" in err
    saved = gpt.read_safetensors(out / "model.safetensors")
    assert set(saved) == set(sft.load_model("tiny").state_dict())  # no adapter tensors, every base tensor
    assert gpt.from_pretrained(str(out)).config.n_embd == 128
    assert_a_whole_hugging_face_folder(out, tmp_path / "tiktoken-cache")


def assert_a_whole_hugging_face_folder(out, cache):
    """config.json names the context and end-of-text, and tiktoken built from the folder's own vocab.json and
    merges.txt encodes the book's 1,100 entries exactly as sft.tokenizer() does."""
    import os
    import tiktoken.load
    from conftest import DATA
    config = json.loads((out / "config.json").read_text())
    assert (config["n_ctx"], config["bos_token_id"], config["eos_token_id"]) == (config["n_positions"], 50256, 50256)
    reference = sft.tokenizer()
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
    assert sft.tokenize(entries, from_folder) == sft.tokenize(entries, reference)


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
    sft.add_neftune(model, alpha=5.0)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), plain)  # eval mode: exactly the model without it
    torch.manual_seed(0)
    noise = block_input(model.train(), ids) - clean
    bound = 5.0 / (50 * 32) ** 0.5
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert abs(noise.abs().mean() / bound - 0.5) < 0.02  # uniform in [-b, b]: mean size b / 2
    off = tiny_model(seed=6)
    sft.add_neftune(off, alpha=0.0)
    with torch.no_grad():
        assert torch.equal(off.train()(ids), plain)  # alpha 0: no noise even while training


def test_a_neftune_run_keeps_its_alpha_in_run_json(tmp_path, capsys):
    data, out = write_data(tmp_path / "d.json", MEMO), tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", out, "--epochs", 1, "--batch-size", 2,
                       "--neftune-alpha", 5)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["neftune_alpha"] == 5
