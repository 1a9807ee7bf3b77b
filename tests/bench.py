"""make bench: speed figures for this machine, each a ratio measured in the same run (not a test; not collected).

training MFU, bf16 autocast against fp32 (in alternating rounds), the tool's training loop and generation against
the book's, checkpoint load RSS, the share of `train` spent outside optimizer steps, and --group-by-length against
the shuffled batches (real tokens, seconds per epoch in alternating rounds, validation loss). Runs in a few minutes on 2
CPU cores, offline."""
import contextlib, io, json, math, os, subprocess, sys, tempfile, time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = str(ROOT / "data" / "instruction-data.json")
CONVERSATIONS = str(ROOT / "data" / "conversations.jsonl")

import gpt, sft  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, RandomSampler  # noqa: E402

ROWS = []


def row(name, value, detail=""):
    ROWS.append((name, value, detail))
    print(f"{name:<44} {value:>10}  {detail}", flush=True)


def matmul_peak(n=2048, reps=4, trials=5):
    """fp32 FLOP/s of a large a @ b, the best of several trials: the machine's practical ceiling for this run."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * reps / best


def small(layers=4):
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(n_embd=768, n_head=12, n_layer=layers))


def flops_per_token(c, T):
    """Matmul FLOPs of forward + backward per token: 6 x (block weights + tied head) + attention scores."""
    return 6 * (12 * c.n_layer * c.n_embd ** 2 + c.vocab_size * c.n_embd) + 12 * c.n_layer * c.n_embd * T


def training_batches(steps, batch):
    """The first (steps + 1) x batch training rows in order, collated: the same batches for every run."""
    enc = sft.load_tokenizer()
    rows = sft.InstructionDataset(sft.split(sft.load_entries(DATA))[0], enc).encoded_texts
    return [sft.custom_collate_fn(rows[i * batch:(i + 1) * batch]) for i in range(steps + 1)]


def training_run(batches, bf16):
    """forward + backward + fused AdamW, as sft.train runs them, over batches from small()'s seeded weights, in fp32
    or under bf16 autocast: (tokens, seconds, model FLOPs) of all steps but the first, which warms up."""
    model, dev = small(), torch.device("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)  # as sft.train
    done, flops, t0 = 0, 0, None
    for i, (x, y) in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()  # the first step warms up
        sft.loss_and_backward(model, [(x, y)], dev, bf16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            done += x.numel()
            flops += x.numel() * flops_per_token(model.config, x.shape[1])
    return done, time.perf_counter() - t0, flops


def training_rows(peak, bf16, tokens, secs, flops, detail=""):
    name = "bf16 autocast" if bf16 else "fp32"
    row(f"train tokens/s, {name} (768 wide, 4 layers)", f"{tokens / secs:,.0f}",
        "forward + backward + AdamW, batch 8, padded" + detail)
    row(f"train MFU, {name} (over fp32 a@b FLOP/s)", f"{flops / secs / peak:.2f}",
        f"a@b reached {peak / 1e9:.0f} GFLOP/s")


def bench_training(peak, bf16=False, steps=6, batch=8):
    """Tokens/s and MFU of one run of `steps` steps, in fp32 or under bf16 autocast."""
    tokens, secs, flops = training_run(training_batches(steps, batch), bf16)
    training_rows(peak, bf16, tokens, secs, flops)
    return tokens / secs


def bench_precisions(peak, rounds=3, steps=6, batch=8):
    """bf16 autocast against fp32 in alternating rounds (fp32, bf16, fp32, bf16, ...), every round on the same
    batches from the same weights, so that a busy machine slows both alike. The speed-up is the ratio of sums: all
    fp32 rounds' seconds over all bf16 rounds' (the same tokens each); each pair's ratio is printed beside it."""
    batches = training_batches(steps, batch)
    runs = {False: [], True: []}  # bf16 -> [(tokens, seconds, flops)] in round order
    for _ in range(rounds):
        for bf16 in (False, True):
            runs[bf16].append(training_run(batches, bf16))
    for bf16, done in runs.items():
        training_rows(peak, bf16, *map(sum, zip(*done)), f"; {rounds} rounds")
    fp32, bf16 = ([secs for _, secs, _ in runs[b]] for b in (False, True))
    pairs = " ".join(f"{f / b:.2f}" for f, b in zip(fp32, bf16))
    speedup = sum(fp32) / sum(bf16)
    row("bf16 autocast training speed-up", f"{speedup:.2f}x",
        f"fp32 seconds / bf16 seconds, summed over {rounds} alternating rounds each (rounds: {pairs})")
    return speedup


def bench_generation(new=64, plain_prompts=2):
    enc = sft.load_tokenizer()
    test = sft.split(sft.load_entries(DATA))[1]
    prompts = [enc.encode_ordinary(sft.format_input(e)) for e in test]  # the book's prompt: the model writes the marker
    model = small().eval()
    t0 = time.perf_counter()
    for k in range(0, len(prompts), 32):
        gpt.generate_batch(model, prompts[k:k + 32], new)
    batched = len(prompts) * new / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for p in prompts[:plain_prompts]:  # the book's generate: one prompt at a time, the whole context per token
        gpt.generate(model, torch.tensor([p]), new, model.config.n_positions)
    plain = plain_prompts * new / (time.perf_counter() - t0)
    row("generate tokens/s, batched + KV cache", f"{batched:,.0f}", f"110 test prompts x {new} new tokens")
    row("generate tokens/s, the book's plain loop", f"{plain:,.0f}", f"{plain_prompts} prompts, one at a time")
    row("generation: the tool's speed over the book's loop", f"{batched / plain:.1f}x", "tokens/s over tokens/s")


def bench_loops(steps=15, batch=8, every=5):
    """The tool's loop (sft.fit) against the book's (sft.train_model_simple) for `steps` optimizer steps over the same
    batches (the first training rows in order, uncut) of the same 768x4 model from the same weights, in fp32. The book's
    step: zero_grad, calc_loss_batch, backward, a plain (for-loop) AdamW step; every 5 steps its evaluate_model,
    calc_loss_loader over 5 training and 5 validation batches. The tool's: the lr written, zero_grad, loss_and_backward
    (summed loss and target count kept on the device), a fused AdamW step; every 5 steps the gradient norm and one
    validation batch of 8 rows. Left out of both: what each does once an epoch (the book's 50-token sample, the tool's
    whole-set validation, answer and save)."""
    enc = sft.load_tokenizer()
    train_e, _, val_e = sft.split(sft.load_entries(DATA))
    collate = partial(sft.custom_collate_fn, allowed_max_length=1024)  # the book's call
    train_loader = DataLoader(sft.InstructionDataset(train_e[:steps * batch], enc), batch, collate_fn=collate)
    val_loader = DataLoader(sft.InstructionDataset(val_e, enc), batch, collate_fn=collate)
    quiet = io.StringIO()

    model = small()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)  # the book's: not fused
    sample = sft.generate
    sft.generate = lambda model, idx, *args, **kwargs: idx  # the once-an-epoch sample, left out
    try:
        with contextlib.redirect_stdout(quiet):
            t0 = time.perf_counter()
            sft.train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=1, eval_freq=every,
                                   eval_iter=5, start_context=sft.format_input(val_e[0]), tokenizer=enc)
            book = time.perf_counter() - t0
    finally:
        sft.generate = sample

    model = small()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)  # as sft.train
    cfg = sft.TrainConfig(model="bench", epochs=1, batch_size=batch, eval_every=every, lr=5e-5)
    with contextlib.redirect_stderr(quiet):
        t0 = time.perf_counter()
        sft.fit(model, optimizer, train_loader, val_loader, "cpu", cfg, math.ceil(8 / batch), lambda *done: None)
        tool = time.perf_counter() - t0
    evaluations = len(range(0, steps, every))
    row("train step, the book's loop: seconds", f"{book / steps:.2f}",
        f"{steps} steps of {batch} rows, {evaluations} evaluations of 5 + 5 batches")
    row("train step, the tool's loop (fit): seconds", f"{tool / steps:.2f}",
        f"the same steps, {evaluations} validations of 1 batch")
    row("training: the tool's speed over the book's loop", f"{book / tool:.2f}x",
        "fp32, 768 wide, 4 layers; the per-epoch extras of both left out")


LOAD = """
import sys, time
sys.path.insert(0, sys.argv[2])
import gpt
def hwm():  # peak RSS of this process in bytes (VmHWM starts afresh at exec, unlike ru_maxrss)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
base, t0 = hwm(), time.perf_counter()
m = gpt.from_pretrained(sys.argv[1])
sum(float(p.detach().sum()) for p in m.parameters())  # touch every weight
print(time.perf_counter() - t0, base, hwm())
"""


def bench_loading(tmp):
    torch.manual_seed(0)
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_embd=1024, n_head=16, n_layer=24)), tmp / "medium")
    size = (tmp / "medium" / "model.safetensors").stat().st_size
    secs, base, peak = map(float, subprocess.check_output([sys.executable, "-c", LOAD, str(tmp / "medium"), str(ROOT)]).split())
    row("load gpt2-medium shape: seconds", f"{secs:.2f}", f"{size / 1e9:.2f} GB file")
    row("load gpt2-medium shape: peak RSS / file", f"{peak / size:.2f}", f"{(peak - base) / size:.2f} above the interpreter's own")


@contextlib.contextmanager
def step_seconds():
    """Yields a list whose one number grows by the time spent inside optimizer steps (backward() + AdamW.step)."""
    inside = [0.0]
    backward, step = sft.loss_and_backward, torch.optim.AdamW.step
    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t0
        return wrapper
    sft.loss_and_backward, torch.optim.AdamW.step = timed(backward), timed(step)
    try:
        yield inside
    finally:
        sft.loss_and_backward, torch.optim.AdamW.step = backward, step


def bench_train_command(tmp, model, label, **kw):
    """Whole `train` wall time against the time inside optimizer steps (backward() + AdamW.step)."""
    with step_seconds() as inside:
        t0 = time.perf_counter()
        sft.train(sft.TrainConfig(model=model, data=DATA, out=str(tmp / "run"), **kw))  # in the default precision
        total = time.perf_counter() - t0
    row(f"train {label}: share outside optimizer steps", f"{1 - inside[0] / total:.1%}", f"{total:.0f}s in all")


def real_shares(data):
    """The share of real (not padding) tokens in one epoch's training batches as `train` draws them (seed 123, batch
    8), shuffled and grouped by length, on all of a data file's training rows."""
    cfg = sft.TrainConfig(model="tiny", data=data)
    with contextlib.redirect_stderr(io.StringIO()):
        train_set = sft.prepare_data(cfg, sft.load_model("tiny"), sft.load_tokenizer())[0]
    lengths = [min(sft.row_length(item), cfg.max_length) for item in train_set]
    shares = {}
    for grouped in (False, True):
        rows = RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed))
        batching = sft.GroupedBatches if grouped else BatchSampler
        shares[grouped] = sft.real_share(list(batching(rows, cfg.batch_size, drop_last=True)), lengths)
    return shares


def bench_grouping(tmp, name, data, rounds=2, epochs=3, limit=400):
    """--group-by-length against the shuffled batches: the real-token share (all rows), then `train` of the tiny model
    on the first `limit` entries in alternating rounds (shuffled, grouped, shuffled, ...; the same seed, so the same
    starting weights): seconds per epoch inside optimizer steps, and the validation loss after the last epoch."""
    shares = real_shares(data)
    seconds = {False: [], True: []}
    losses = {}
    for _ in range(rounds):
        for grouped in (False, True):
            out = tmp / f"grouped-{grouped}"
            cfg = sft.TrainConfig(model="tiny", data=data, limit=limit, epochs=epochs, out=str(out),
                                  group_by_length=grouped, eval_every=1000)
            with contextlib.redirect_stderr(io.StringIO()), step_seconds() as inside:
                sft.train(cfg)
            seconds[grouped].append(inside[0] / epochs)
            losses[grouped] = json.loads((out / "run.json").read_text())["val_loss"]
    for grouped, label in ((False, "shuffled"), (True, "grouped by length")):
        row(f"{name}, {label}: real tokens", f"{shares[grouped]:.1%}", "of one epoch's batch elements, all rows")
        row(f"{name}, {label}: s/epoch (tiny)", f"{sum(seconds[grouped]) / rounds:.1f}",
            f"{limit} entries, rounds: {' '.join(f'{s:.1f}' for s in seconds[grouped])}")
        row(f"{name}, {label}: validation loss", f"{losses[grouped]:.3f}", f"tiny, after {epochs} epochs")
    row(f"{name}: grouping speed-up", f"{sum(seconds[False]) / sum(seconds[True]):.2f}x",
        f"shuffled seconds / grouped seconds, {rounds} alternating rounds each")


if __name__ == "__main__":
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        peak = matmul_peak()
        if sft.native_bf16(torch.device("cpu")):  # bf16 autocast is what train picks here by default
            bench_precisions(peak)
        else:
            bench_training(peak)
            row("bf16 autocast", "-", "this CPU has no native bf16: train uses fp32")
        bench_loops()
        bench_generation()
        bench_loading(tmp)
        bench_train_command(tmp, "tiny", "tiny (book data, 2 epochs)")
        gpt.save_pretrained(small(), tmp / "small4")
        bench_train_command(tmp, str(tmp / "small4"), "768x4 (200 entries, 1 epoch)", limit=200, epochs=1)
        bench_grouping(tmp, "book data", DATA)
        bench_grouping(tmp, "conversations", CONVERSATIONS)
