"""Rules a user relies on that plausible slips in the code would break: each test here was seen to fail with its
slip planted by hand."""
import itertools, json

import pytest
import torch
from torch.utils.data import DataLoader

import gpt
import judge
import sft
from conftest import tiny_model
from test_cli import MEMO, run, write_data

CACHED_PASS = gpt.cached_pass
FIT = sft.fit
CALC_LOSS_LOADER = sft.calc_loss_loader
IGNORE = -100  # the book's ignore_index, cross_entropy's default


def small_gpt2(seed=0):
    """GPT-2's vocabulary (the tokenizer's ids) at a tiny width: quick to run, and answers decode."""
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(n_embd=32, n_layer=1, n_head=2, n_positions=128))


@pytest.fixture(scope="module")
def enc():
    return sft.load_tokenizer()


@pytest.fixture(scope="module")
def memo_rows(enc):
    """MEMO's rows as exercise 7.2's (instruction length, ids) items: masked prompts of different lengths."""
    entries = [{"instruction": i, "input": x, "output": o} for i, x, o in MEMO]
    return list(sft.InstructionDataset(entries, enc, mask_prompt=True))


def quiet_fit(model, train_loader, val_loader, after_epoch=lambda epoch, reports: None, **settings):
    """The tool's loop on loaders built here, AdamW at the tiny rate, one report a step unless told."""
    cfg = sft.TrainConfig(model="tiny", **{"epochs": 1, "eval_every": 1, **settings})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    FIT(model, optimizer, train_loader, val_loader, "cpu", cfg, 1, after_epoch)


# ---------------------------------------------------------------- answers and generation
def test_answer_answers_every_entry_past_the_first_chunk_in_the_entries_order(enc):
    words = ["cat", "river", "seven", "blue", "mountain", "quietly", "paper", "storm", "orange", "bridge"]
    # 70 entries, more than two chunks of 32; their lengths go up and down, so sorting by length mixes the chunks;
    # each ends in its own number, so the answers differ
    entries = [{"instruction": " ".join(["Please"] * (i * 7 % 11)) + f" name the {words[i % 10]} {i}", "input": ""}
               for i in range(70)]
    model = small_gpt2(seed=4).eval()
    # the phi3 prompt: short, so the chapter's loop below, one entry at a time, stays quick
    answers = sft.answer(model, entries, enc, "phi3", max_new_tokens=2)
    book = sft.respond(model, entries, enc, "cpu", "phi3", max_new_tokens=2)
    assert all(book)  # every answer says something
    assert len(set(book)) > 60  # and nearly all differ, so a mix-up would show
    assert answers == book


def scripted_passes(monkeypatch, eos_id, ends):
    """Patches gpt.cached_pass to record each pass and make row r answer eos_id at its step ends[r] (None: never),
    whatever the model says; returns the list of passes."""
    passes = []

    def scripted(*args):
        logits = CACHED_PASS(*args)
        step = len(passes)
        passes.append(step)
        for row, end in enumerate(ends):
            logits[row, :, eos_id] = 1e4 if step == end else float("-inf")  # 1e4: certain even when sampled
        return logits
    monkeypatch.setattr(gpt, "cached_pass", scripted)
    return passes


def test_a_greedy_batch_stops_once_every_row_has_ended_at_its_end_of_text_or_its_budget(monkeypatch):
    model = tiny_model(seed=2)  # context 64
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], list(range(1, 61))]  # the 60-token prompt has a budget of 4
    passes = scripted_passes(monkeypatch, 511, [1, 3, None])
    got = gpt.generate_batch(model, prompts, 12, eos_id=511)
    assert [len(row) for row in got] == [1, 3, 4]
    # 4 passes make the 4 tokens; the 5th finds every row ended, each answers end-of-text and the loop stops
    assert len(passes) == 5


@pytest.mark.parametrize("top_k", [None, 40])
def test_a_sampled_batch_whose_rows_end_at_different_steps_gives_each_row_valid_ids_up_to_its_end(monkeypatch,
                                                                                                 top_k):
    model = tiny_model(seed=3)
    prompts = [[5, 6, 7], [9, 10], [100, 200, 300, 400]]
    scripted_passes(monkeypatch, 511, [1, 5, 3])  # row 0 ends first: from then on its logits are all but eos -inf
    torch.manual_seed(0)
    got = gpt.generate_batch(model, prompts, 12, temperature=0.8, top_k=top_k, eos_id=511)
    assert [len(row) for row in got] == [1, 5, 3]  # each row up to its own end-of-text, which is not returned
    assert all(0 <= token < 511 for row in got for token in row)  # ids of the vocabulary, none the end-of-text


# ---------------------------------------------------------------- the judge's scores
@pytest.mark.parametrize("reply", ["8 points of 10 are covered.", "85 is what the response earns, I think.",
                                   "3 of the 4 items are listed.", "100 percent of the steps are there.",
                                   "2 errors: the capital and the year."])
def test_a_number_opening_a_line_of_more_text_is_no_score(reply):
    assert judge.parse_score(reply) is None


# ---------------------------------------------------------------- checkpoints this GPT-2 cannot represent
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    gpt.save_pretrained(tiny_model(), folder)
    return folder


def with_config(folder, target, **edit):
    """The saved folder's weights (linked) and config, edited, in the folder target."""
    target.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **edit}))
    (target / "model.safetensors").symlink_to(folder / "model.safetensors")
    return str(target)


def test_a_checkpoint_with_the_exact_gelu_is_refused_in_one_line(saved_tiny, tmp_path):
    # this GPT-2 computes the tanh GELU, as gelu_new and gelu_pytorch_tanh name it; "gelu" is the exact one
    assert gpt.read_config(with_config(saved_tiny, tmp_path / "tanh", activation_function="gelu_pytorch_tanh")
                           + "/config.json")
    folder = with_config(saved_tiny, tmp_path / "exact", activation_function="gelu")
    with pytest.raises(ValueError, match="activation_function gelu .*cannot represent") as refused:
        gpt.from_pretrained(folder)
    assert "\n" not in str(refused.value)


def test_a_checkpoint_without_scaled_attention_weights_is_refused_in_one_line(saved_tiny, tmp_path):
    folder = with_config(saved_tiny, tmp_path / "unscaled", scale_attn_weights=False)
    with pytest.raises(ValueError, match="scale_attn_weights False .*cannot represent") as refused:
        gpt.from_pretrained(folder)
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------- the tool's loop and its reports
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_a_report_whose_steps_had_no_target_stops_the_run_rather_than_report_a_loss_of_0(memo_rows, max_grad_norm):
    inputs, targets = sft.custom_collate_fn(memo_rows[:2])
    no_target = [(inputs, torch.full_like(targets, IGNORE))]  # a batch whose rows were all cut before their response
    validation = [sft.custom_collate_fn(memo_rows[8:])]
    reports = []
    with pytest.raises(ValueError, match="had no target") as stopped:
        quiet_fit(small_gpt2(), no_target, validation, lambda epoch, done: reports.extend(done),
                  max_grad_norm=max_grad_norm)
    assert "\n" not in str(stopped.value)
    assert reports == []


def test_a_report_step_without_a_target_of_its_own_reports_the_steps_before_it(memo_rows):
    inputs, targets = sft.custom_collate_fn(memo_rows[:2])
    batches = [(inputs, targets), (inputs, targets), (inputs, torch.full_like(targets, IGNORE))]
    validation = [sft.custom_collate_fn(memo_rows[8:])]
    reports = []
    quiet_fit(small_gpt2(), batches, validation, lambda epoch, done: reports.extend(done), eval_every=2)
    assert [r["step"] for r in reports] == [0, 2]
    assert reports[1]["train_loss"] > 0 and reports[1]["grad_norm"] == 0.0  # step 1's loss; step 2 had no gradient


def test_val_rows_is_the_rows_the_curve_measured_with_a_batch_size_that_does_not_divide_8(tmp_path, capsys,
                                                                                          monkeypatch):
    gpt.save_pretrained(small_gpt2(), tmp_path / "base")
    data = write_data(tmp_path / "d.json", [MEMO[i % 10] for i in range(180)])  # 153 train, 18 test, 9 validation
    measured = []

    def measuring(loader, model, device, num_batches=None):
        if num_batches is not None:  # the curve's, at a report
            measured.append(sum(len(inputs) for inputs, _ in itertools.islice(loader, num_batches)))
        return CALC_LOSS_LOADER(loader, model, device, num_batches)

    def one_step(model, optimizer, train_loader, *rest):  # the loop as it is, on the first batch only: one report
        return FIT(model, optimizer, [next(iter(train_loader))], *rest)
    monkeypatch.setattr(sft, "calc_loss_loader", measuring)
    monkeypatch.setattr(sft, "fit", one_step)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", tmp_path / "base", "--data", data, "--out", out, "--epochs", 1,
                       "--batch-size", 3, "--precision", "fp32")
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert measured == [9]  # ceil(8 / 3) = 3 batches of 3 rows
    assert [m["val_rows"] for m in metrics] == [9]
    assert "validation on 9 rows at each report" in err


def test_tokens_seen_count_every_micro_batch_of_a_step_with_its_padding_and_masked_prompt(memo_rows):
    # rows of 2 a micro-batch, 2 micro-batches a step: the 8 training rows make 2 steps
    loader = DataLoader(memo_rows[:8], batch_size=2, collate_fn=sft.custom_collate_fn)
    widths = [inputs.shape[1] for inputs, _ in loader]
    targets = [int((t != IGNORE).sum()) for _, t in loader]
    reports = []
    quiet_fit(small_gpt2(), loader, [sft.custom_collate_fn(memo_rows[8:])], lambda epoch, done: reports.extend(done),
              grad_accum=2)
    first = 2 * widths[0] + 2 * widths[1]  # each micro-batch's elements, padding and prompt included
    second = 2 * widths[2] + 2 * widths[3]
    assert [r["tokens"] for r in reports] == [first, first + second]
    assert first != sum(targets[:2])  # counting the targets would differ
    assert widths[0] != widths[1]  # and so would counting one micro-batch for both


def test_each_epoch_trains_in_train_mode_after_the_previous_epochs_sample_and_save(memo_rows, enc):
    model = small_gpt2()
    forwards = []

    def record(module, inputs, output):  # whether a step's (validation runs without gradients), and the mode
        forwards.append((torch.is_grad_enabled(), module.training))
    model.register_forward_hook(record)

    def save(epoch, reports):  # as train's save: an answer, which leaves the model in eval mode
        sft.answer(model, [{"instruction": "Say yes.", "input": ""}], enc, max_new_tokens=2)
        forwards.append("saved")
    loader = DataLoader(memo_rows[:4], batch_size=2, collate_fn=sft.custom_collate_fn)
    quiet_fit(model, loader, [sft.custom_collate_fn(memo_rows[8:])], save, epochs=2, eval_every=100)
    epoch_2 = forwards[forwards.index("saved") + 1:-1]  # between the two saves
    steps = [training for grad, training in epoch_2 if grad]
    assert len(steps) == 2
    assert all(steps)  # NEFTune's noise, were it on, from epoch 2's first step
