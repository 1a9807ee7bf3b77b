"""--group-by-length: the batches of GroupedBatches, proven as properties over random lengths, batch sizes and seeds."""
import torch
from hypothesis import assume, given, settings, strategies as st
from torch.utils.data import BatchSampler, RandomSampler

import sft

# row lengths as instruction data has them: many short rows and a long tail
LENGTHS = st.lists(st.one_of(st.integers(1, 120), st.integers(121, 1500)), min_size=1, max_size=900)
SIZES = st.integers(1, 12)
SEEDS = st.integers(0, 2 ** 32 - 1)


def rows_of(lengths):
    return [[7] * n for n in lengths]  # id lists of these lengths: what row_length reads


def epochs(lengths, batch_size, seed, grouped=True, count=1):
    """`count` epochs of batches (lists of row indices) drawn as `train` draws them, from one seeded generator;
    train refuses fewer rows than a batch."""
    assume(len(lengths) >= batch_size)
    rows = RandomSampler(rows_of(lengths), generator=torch.Generator().manual_seed(seed))
    batching = sft.GroupedBatches if grouped else BatchSampler
    batches = batching(rows, batch_size, drop_last=True)
    return [list(batches) for _ in range(count)]


@settings(max_examples=60)
@given(LENGTHS, SIZES, SEEDS)
def test_each_epoch_holds_every_row_once_in_batches_of_the_asked_size_but_drop_lasts_remainder(lengths, size, seed):
    for batches in epochs(lengths, size, seed, count=2):
        seen = [i for batch in batches for i in batch]
        assert all(len(batch) == size for batch in batches)
        assert len(seen) == len(set(seen)) == len(lengths) // size * size  # no row twice; the remainder dropped
        assert len(batches) == len(epochs(lengths, size, seed, grouped=False)[0])  # as many steps as shuffled


@settings(max_examples=60)
@given(LENGTHS, SIZES, SEEDS)
def test_the_batch_holding_the_epochs_longest_row_comes_first(lengths, size, seed):
    for batches in epochs(lengths, size, seed, count=2):
        longest = max(lengths[i] for batch in batches for i in batch)
        assert max(lengths[i] for i in batches[0]) == longest


@settings(max_examples=40)
@given(LENGTHS, SIZES, SEEDS)
def test_the_same_seed_gives_the_same_batches_and_another_epoch_other_batches(lengths, size, seed):
    first = epochs(lengths, size, seed, count=3)
    assert epochs(lengths, size, seed, count=3) == first
    if len(lengths) // size >= 8:  # 7 batches after the first can be ordered 5,040 ways: three epochs alike is chance
        assert not first[0] == first[1] == first[2]


@settings(max_examples=60)
@given(LENGTHS, SIZES, SEEDS)
def test_grouped_batches_hold_at_least_the_real_token_share_of_the_shuffled_ones_from_the_same_seed(lengths, size, seed):
    shuffled = epochs(lengths, size, seed, grouped=False)[0]
    grouped = epochs(lengths, size, seed)[0]
    assert sft.real_share(grouped, lengths) >= sft.real_share(shuffled, lengths)
    kept = sorted(i for batch in grouped for i in batch)
    assert kept == sorted(i for batch in shuffled for i in batch)  # the same rows
    if len(lengths) <= 50 * size:  # one pool: the batches cut the kept rows' lengths in sorted order
        ordered = sorted(lengths[i] for i in kept)
        runs = [ordered[k:k + size] for k in range(0, len(ordered), size)]
        assert sorted(sorted(lengths[i] for i in batch) for batch in grouped) == runs


def test_real_share_counts_each_batch_padded_to_its_longest_row():
    lengths = [3, 5, 2, 2]
    assert sft.real_share([[0, 1], [2, 3]], lengths) == 12 / (2 * 5 + 2 * 2)
    assert sft.real_share([[2, 3]], lengths) == 1.0


def test_train_with_group_by_length_keeps_the_setting_and_each_epoch_sees_every_row_longest_first(
        monkeypatch, capsys, tmp_path):
    import json
    from test_rules import batches_seen, small_base
    base = small_base(tmp_path)
    steps = batches_seen(monkeypatch, capsys, tmp_path, base, "--group-by-length", "--epochs", 2)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["group_by_length"] is True
    for epoch in (steps[:4], steps[4:]):  # 8 training rows, 2 a step
        rows = [row for step in epoch for row in step]
        assert len(rows) == len(set(rows)) == 8
        assert max(map(len, epoch[0])) == max(map(len, rows))  # the longest row's batch first
    assert steps[:4] != steps[4:]


def test_train_says_the_share_of_real_tokens_and_hints_at_grouping_only_when_it_is_off_and_under_90(
        capsys, tmp_path):
    from test_cli import run, write_data
    from test_rules import small_base
    base = small_base(tmp_path)
    # 16 entries: 12 training rows, every third one long: shuffled batches of 4 are mostly padding
    data = write_data(tmp_path / "d.json", [(f"Say {k}.", "", "word " * (40 if k % 3 == 0 else 1)) for k in range(16)])
    said = {}
    for flags in ([], ["--group-by-length"]):
        code, _, err = run(capsys, "train", "--model", base, "--data", data, "--out", tmp_path / "run", "--epochs", 1,
                           "--batch-size", 4, *flags)
        assert code == 0, err
        [line] = [line for line in err.splitlines() if line.startswith("batches: ")]
        said[bool(flags)] = (float(line.split()[1].rstrip("%")), "hint: --group-by-length" in err)
    assert said[False][0] < 90 and said[False][1]  # under 90% without grouping: the hint
    assert said[True][0] > said[False][0] and not said[True][1]  # grouped: more real tokens, no hint
