"""sft.py train / eval / generate through the command line: the whole job, the run directory, user errors."""
import json, os, subprocess, sys, xml.etree.ElementTree as ET

import pytest
import torch

import gpt
import sft
from conftest import DATA, FIXTURE, ollama

MEMO = [("Name a primary color.", "", "Red."), ("What is 2 plus 2?", "", "Four."), ("Translate to French.", "cat", "chat"),
        ("Opposite of hot?", "", "Cold."), ("Capital of Italy?", "", "Rome is the capital."),
        ("Spell dog backwards.", "", "god"), ("Largest planet?", "", "Jupiter."), ("Say yes.", "", "Yes."),
        ("Color of grass?", "", "Green."), ("Number after nine?", "", "Ten.")]


RUN_FOLDER = ["config.json", "loss.svg", "merges.txt", "metrics.jsonl", "model.safetensors", "run.json", "vocab.json"]


def write_data(path, entries):
    path.write_text(json.dumps([{"instruction": i, "input": x, "output": o} for i, x, o in entries]))
    return str(path)


def run(capsys, *argv):
    """sft.main in-process; returns (exit code, stdout, stderr)."""
    try:
        sft.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_quietly(*argv):
    """sft.main in-process without capsys (for fixtures wider than a test); returns (exit code, stderr)."""
    import contextlib, io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            sft.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A run that learnt MEMO[:8] by heart in the phi3 style with prompt masking (exercises 7.1 and 7.2); its test
    split is MEMO[8:] five times, its validation MEMO[:5]."""
    tmp_path = tmp_path_factory.mktemp("memorised")
    torch.manual_seed(0)
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=128, n_embd=64, n_layer=2, n_head=4)), tmp_path / "base")
    entries = [MEMO[i % 8] for i in range(85)] + MEMO[8:] * 5 + MEMO[:5]  # the split: 85 train rows of MEMO[:8]
    data, out = write_data(tmp_path / "d.json", entries), tmp_path / "run"
    code, err = run_quietly("train", "--model", tmp_path / "base", "--data", data, "--out", out, "--epochs", 6,
                            "--batch-size", 4, "--lr", 3e-3, "--style", "phi3", "--mask-prompt", "--eval-every", 1000,
                            "--precision", "fp32")  # answers verbatim: the same numbers on every CPU
    assert code == 0, err
    return out


def test_a_small_model_memorises_a_handful_of_entries_and_stops_by_itself(memorised, capsys):
    """Also exercises 7.1 and 7.2: the phi3 style and prompt masking are kept with the run and used by generate."""
    out = memorised
    settings = json.loads((out / "run.json").read_text())
    assert settings["style"] == "phi3" and settings["mask_prompt"] is True
    for instruction, given, answer in MEMO[:8]:  # the training split
        code, stdout, _ = run(capsys, "generate", "--out", out, instruction, "--input", given, "--max-new-tokens", 30)
        assert (code, stdout) == (0, answer + "\n")  # verbatim through the phi3 prompt, and it stopped by itself


def test_evals_responses_are_the_chapters_respond_loop_answers(memorised, capsys, monkeypatch):
    """The fast path (batched, KV-cached, sorted by length) gives what the book's respond() gives, marker removed."""
    url, bodies = ollama(replies=["50"])
    monkeypatch.setenv("OLLAMA_HOST", url)
    code, _, err = run(capsys, "eval", "--out", memorised)
    assert code == 0, err
    saved = json.loads((memorised / "instruction-data-with-response.json").read_text())
    model, cfg = sft.load_run(str(memorised), "cpu")
    test = [{k: e[k] for k in ("instruction", "input", "output")} for e in saved]
    assert [(e["instruction"], e["output"]) for e in test] == [MEMO[8][::2], MEMO[9][::2]] * 5  # the test split
    book = sft.respond(model, test[:2], sft.load_tokenizer(), "cpu", style="phi3")  # the two distinct entries
    assert [r["model_response"] for r in saved] == book * 5 and all(book)
    assert len(bodies) == 2  # the judge is asked once per distinct prompt
    assert not any("<|assistant|>" in r or "<|user|>" in r for r in book)


def test_a_local_checkpoint_trains_writes_the_run_directory_and_evaluates(tmp_path, capsys, monkeypatch):
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=96, n_embd=32, n_layer=2, n_head=4)), tmp_path / "base")
    data, out = str(tmp_path / "d.json"), tmp_path / "run"
    (tmp_path / "d.json").write_text(json.dumps(json.loads(DATA.read_text())[:40]))
    code, _, err = run(capsys, "train", "--model", tmp_path / "base", "--data", data, "--out", out, "--batch-size", 4, "--eval-every", 3)
    assert code == 0, err
    assert sorted(os.listdir(out)) == RUN_FOLDER
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 3, 6, 9, 12, 15]  # 34 train rows // 4 = 8 steps an epoch, 0 .. 15
    assert all({"step", "epoch", "tokens", "train_loss", "val_loss", "seconds"} <= m.keys() for m in metrics)
    assert [m["val_rows"] for m in metrics] == [2] * 6  # every point: the same rows (the 2 validation rows here)
    settings = json.loads((out / "run.json").read_text())
    assert (settings["epochs_done"], settings["val_rows"]) == (2, 2) and settings["val_loss"] > 0  # the whole set
    svg = ET.parse(out / "loss.svg").getroot()
    lines = {p.get("id"): p for p in svg.iter("{http://www.w3.org/2000/svg}polyline")}
    assert lines.keys() == {"train", "validation"} and lines["validation"].get("stroke-dasharray") != "none"
    assert len(lines["train"].get("points").split()) == len(metrics)  # a point per report
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert {"epoch 1", "optimizer step", "loss", "train: the steps since the last point",
            "validation: the same 2 rows at every point"} <= set(texts)  # what each curve measures
    y_ticks = [float(t.text) for t in svg.iter("{http://www.w3.org/2000/svg}text")
               if t.get("text-anchor") == "end" and t.get("fill") != "gray"]
    losses = [m[k] for m in metrics for k in ("train_loss", "val_loss")]
    assert y_ticks[0] == pytest.approx(min(losses), abs=0.01) and y_ticks[-1] == pytest.approx(max(losses), abs=0.01)
    x_ticks = [int(t.text) for t in svg.iter("{http://www.w3.org/2000/svg}text") if t.get("y") == "368.0"]
    assert x_ticks == [0, 4, 8, 11, 15]  # evenly spaced, from the first report to the last, none repeated
    url, bodies = ollama(replies=["Score: 80", "70", "I'd rate it 90 out of 100.", "no idea"])
    monkeypatch.setenv("OLLAMA_HOST", url)
    code, _, err = run(capsys, "eval", "--out", out)
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert len(responses) == 4 and all("model_response" in r for r in responses)
    scores = json.loads((out / "instruction-data-with-response-scores.json").read_text())
    assert len(bodies) == 4 and code == 0, err
    got = [e["score"] for e in scores["entries"] if e["score"] is not None]
    assert scores["average"] == pytest.approx(sum(got) / len(got)) and scores["total"] == 4


@pytest.fixture
def small_data(tmp_path):
    return write_data(tmp_path / "d.json", MEMO)


ERRORS = {
    "missing data": (["train", "--model", "tiny", "--data", "{tmp}/nope.json"], "nope.json: cannot read JSON (No such file"),
    "malformed data": (["train", "--model", "tiny", "--data", "{tmp}/bad.json"], "bad.json: cannot read JSON (Expecting"),
    "too few entries": (["train", "--model", "tiny", "--data", "{data}", "--limit", "9"], "too few to split"),
    "unknown local model": (["train", "--model", "./no/such/model", "--data", "{data}"], "no such folder"),
    "negative epochs": (["train", "--model", "tiny", "--data", "{data}", "--epochs", "-1"], "--epochs must be a positive number"),
    "negative seed": (["train", "--model", "tiny", "--data", "{data}", "--seed", "-1"], "--seed must be a positive number"),
    "zero batch size": (["train", "--model", "tiny", "--data", "{data}", "--batch-size", "0"], "--batch-size must be a positive number"),
    "unavailable device": (["train", "--model", "tiny", "--data", "{data}", "--device", "tpu"], "--device tpu is not available here"),
    "zero learning rate": (["train", "--model", "tiny", "--data", "{data}", "--lr", "0"], "--lr must be a positive number"),
    "infinite learning rate": (["train", "--model", "tiny", "--data", "{data}", "--lr", "inf"], "--lr must be a positive"),
    "NaN LoRA alpha": (["train", "--model", "tiny", "--data", "{data}", "--lora-alpha", "nan"], "--lora-alpha must be"),
    "negative LoRA rank": (["train", "--model", "tiny", "--data", "{data}", "--lora-rank", "-2"], "--lora-rank must be"),
    "negative NEFTune alpha": (["train", "--model", "tiny", "--data", "{data}", "--neftune-alpha", "-5"], "--neftune-alpha must be"),
    "unknown schedule": (["train", "--model", "tiny", "--data", "{data}", "--schedule", "linear"], "--schedule linear: not one of"),
    "negative warmup": (["train", "--model", "tiny", "--data", "{data}", "--warmup-steps", "-1"], "--warmup-steps must be"),
    "negative clipping norm": (["train", "--model", "tiny", "--data", "{data}", "--max-grad-norm", "-1"], "--max-grad-norm must"),
    "unknown style": (["train", "--model", "tiny", "--data", "{data}", "--style", "chatml"], "--style chatml: not one of alpaca, phi3"),
    "malformed device": (["train", "--model", "tiny", "--data", "{data}", "--device", "cpu:abc"], "--device cpu:abc is not available"),
    "nested data": (["train", "--model", "tiny", "--data", "{tmp}/deep.json"], "deep.json: cannot read JSON (maximum recursion"),
    "batch over the rows": (["train", "--model", "tiny", "--data", "{data}", "--batch-size", "9"], "is over the 8 training rows"),
    # the 8 training prompts are 27 to 36 tokens, without the marker: at 26 columns none keeps a target
    "every target masked": (["train", "--model", "tiny", "--data", "{data}", "--mask-prompt", "--max-length", "26"],
                            "8 of 8 training rows keep no target after --max-length 26 with --mask-prompt"),
    "eval of an empty folder": (["eval", "--out", "{tmp}"], "holds no run that train wrote"),
    "generate of an empty folder": (["generate", "--out", "{tmp}", "hi"], "holds no run that train wrote"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_are_one_line_and_a_nonzero_exit(tmp_path, capsys, small_data, case):
    argv, message = ERRORS[case]
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    argv = [a.format(tmp=tmp_path, data=small_data) for a in argv] + (["--out", str(tmp_path / "run")] if argv[0] == "train" else [])
    code, out, err = run(capsys, *argv)
    assert isinstance(code, str) and code.startswith("error: ") and message in code and "\n" not in code
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_hub_404_through_the_cli_is_one_line_without_traceback(tmp_path, small_data):
    from conftest import serve
    import http.server
    url, _ = serve(http.server.SimpleHTTPRequestHandler)  # serves this folder: every hub path is a 404
    env = {**os.environ, "HF_ENDPOINT": url}
    p = subprocess.run([sys.executable, "sft.py", "train", "--model", "nobody/nothing", "--data", small_data, "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, env=env, cwd=os.path.dirname(sft.__file__))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1  # no warning from an import either
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "nobody/nothing" in p.stderr and "not found" in p.stderr.lower()
    assert not (tmp_path / "run" / "run.json").exists()


def test_eval_without_ollama_keeps_the_responses_and_says_how_to_score_later(tmp_path, capsys, monkeypatch):
    from test_judge import free_port
    out = fake_run(tmp_path, MEMO)  # eval needs a run folder, not a trained one
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")
    code, _, err = run(capsys, "eval", "--out", out)
    assert isinstance(code, str) and "cannot reach the judge at" in code and "ollama serve" in code
    assert f"python sft.py judge {out}/instruction-data-with-response.json" in code and "\n" not in code
    assert err.index("warning: cannot reach the judge") < err.index("answered 1 of 1")  # said before generating
    assert "Correct response:\n>> " + MEMO[8][2] in err and "Model response:\n>> " in err  # the book's example print
    assert len(json.loads((out / "instruction-data-with-response.json").read_text())) == 1
    assert not (out / "instruction-data-with-response-scores.json").exists()


def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, small_data):
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=96, n_embd=32, n_layer=2, n_head=4)), tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    code, _, _ = run(capsys, "train", "--model", tmp_path / "base", "--data", small_data, "--out", tmp_path / "run")
    assert isinstance(code, str) and f"{weights}: not a valid safetensors file" in code and "\n" not in code


def test_ctrl_c_during_training_keeps_the_last_finished_epoch_and_says_so(tmp_path, small_data):
    import signal
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "sft.py", "train", "--model", "tiny", "--data", small_data, "--out", str(out),
                          "--epochs", "1000", "--batch-size", "2"], stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(sft.__file__))
    for line in p.stderr:  # wait until the second epoch has been saved
        if line.startswith("epoch 2: validation loss"):
            break
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 1 and "Traceback" not in rest
    last = rest.strip().splitlines()[-1]
    kept = json.loads((out / "run.json").read_text())["epochs_done"]
    assert kept >= 2 and last == f"interrupted: {out} holds epoch {kept}"  # what was kept, truthfully
    assert sorted(os.listdir(out)) == RUN_FOLDER


def test_ctrl_c_before_the_first_epoch_says_what_the_folder_still_holds(tmp_path, small_data, capsys, monkeypatch):
    out = tmp_path / "run"
    train_one_epoch = sft.loss_and_backward

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(sft, "loss_and_backward", interrupted)
    said = f"interrupted: no epoch of this run finished; {out} holds what it held before"
    code, _, _ = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out)
    assert code == said and os.listdir(out) == []  # nothing saved
    monkeypatch.setattr(sft, "loss_and_backward", train_one_epoch)
    assert run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out, "--epochs", 1)[0] == 0
    weights = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(sft, "loss_and_backward", interrupted)
    code, _, _ = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out)
    assert code == said and json.loads((out / "run.json").read_text())["epochs_done"] == 1  # the earlier run's
    assert (out / "model.safetensors").read_bytes() == weights


def fake_run(tmp_path, entries, **settings):
    """A run folder without training: the tiny model's random weights and a run.json pointing at the data."""
    out = tmp_path / "run"
    torch.manual_seed(1)
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=320, n_embd=32, n_layer=2, n_head=4)), out)  # small: fast
    cfg = sft.TrainConfig(model="tiny", data=write_data(tmp_path / "d.json", entries), out=str(out), **settings)
    (out / "run.json").write_text(json.dumps(sft.asdict(cfg)))
    return out


def test_responses_come_back_in_the_entries_order_not_the_length_order(tmp_path, capsys, monkeypatch):
    from test_judge import free_port
    filler = [(f"Filler {i}.", "", "x") for i in range(25)]
    long = ("Write a long story about a cat who sails the seven seas and finds a treasure " * 3, "", "y")
    test = [long, ("Hi.", "", "z"), ("Name two colors of the rainbow.", "", "w")]  # sorting by length reorders these
    out = fake_run(tmp_path, filler + test + [("Val.", "", "v")] * 2)  # 30 entries: 25 train, 3 test, 2 validation
    model, cfg = sft.load_run(str(out), "cpu")
    entries = [{"instruction": i, "input": x, "output": o} for i, x, o in test]
    alone = [sft.answer(model, [e], sft.load_tokenizer(), max_new_tokens=8)[0] for e in entries]
    assert len(set(alone)) == 3  # distinct answers, so a mix-up would show
    assert sft.answer(model, entries, sft.load_tokenizer(), max_new_tokens=8) == alone
    assert sft.respond(model, entries, sft.load_tokenizer(), "cpu", max_new_tokens=8) == alone  # the chapter's slow loop
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")
    run(capsys, "eval", "--out", out)  # no judge: the responses (256 tokens each) are still written
    saved = json.loads((out / "instruction-data-with-response.json").read_text())
    assert [r["instruction"] for r in saved] == [e["instruction"] for e in entries]
    assert all(r["model_response"].startswith(a) for r, a in zip(saved, alone))  # each begins as its own answer


def test_rows_left_without_a_target_are_counted_and_a_loss_over_no_token_is_never_a_number(tmp_path, capsys):
    short = [(f"Say {w}.", "", w) for w in ("yes", "no", "up", "down", "left", "right", "in", "out", "on", "off")]
    long = [(i + " Answer at length, please, with every detail you know.", x, o) for i, x, o in MEMO]
    data = write_data(tmp_path / "d.json", [*long[:4], *short[:4], long[4], short[4]])  # train 8, validation 1
    # the long prompts are 41 to 48 tokens, the short ones 27 (the marker not counted): 40 columns cut the long ones
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", tmp_path / "run", "--epochs", 1,
                       "--batch-size", 2, "--mask-prompt", "--max-length", 40)
    assert code == 0, err
    assert "4 of 8 training rows keep no target" in err and "validation rows keep no target" not in err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train_loss"] > 0 and m["val_loss"] > 0 for m in metrics)


def test_a_validation_row_without_a_target_is_refused_before_training_in_one_line(tmp_path, capsys):
    """The book's calc_loss_loader: a batch with no target is NaN (cross_entropy's), and so is the mean of the batch
    means; the tool refuses such a validation split before it trains, rather than save a NaN."""
    short = [(f"Say {w}.", "", w) for w in ("yes", "no", "up", "down", "left", "right", "in", "out", "on", "off")]
    long = [(i + " Answer at length, please, with every detail you know.", x, o) for i, x, o in MEMO]
    data = write_data(tmp_path / "d.json", [short[i % 10] for i in range(47)] + [long[0], long[1], short[0]])
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", tmp_path / "run", "--epochs", 1,
                       "--batch-size", 2, "--mask-prompt", "--max-length", 40)  # validation: [long, long], [short]
    assert "training rows keep no target" not in err and "step 0" not in err  # refused before the first step
    assert code == "error: 2 of 3 validation rows keep no target after --max-length 40 with --mask-prompt: raise it, or leave out --mask-prompt"
    assert not (tmp_path / "run" / "run.json").exists()


def test_with_mask_prompt_the_response_marker_stays_a_target(tmp_path, capsys, small_data):
    """Exercise 7.2 as the book: only the prompt's own tokens are masked. Three training prompts and the validation one
    are 27 or 28 tokens: at --max-length 28 what is left of them to learn is the marker's first tokens, so the run
    trains (were the marker masked too, no row would keep a target)."""
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "run", "--epochs", 1,
                       "--batch-size", 8, "--mask-prompt", "--max-length", 28)
    assert code == 0, err
    assert "5 of 8 training rows keep no target" in err and "validation rows keep no target" not in err


def test_training_caps_max_length_at_a_short_model_context(tmp_path, capsys):
    base = tmp_path / "base"
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=24, n_embd=32, n_layer=2, n_head=4)), base)
    data = write_data(tmp_path / "d.json", MEMO)  # alpaca prompts are over 40 tokens: longer than the context
    code, _, err = run(capsys, "train", "--model", base, "--data", data, "--out", tmp_path / "run", "--epochs", 1)
    assert code == 0, err
    assert "9 cut to --max-length 24" in err  # the train and validation rows
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["val_loss"] > 0 for m in metrics)


def test_generate_answers_each_line_of_stdin_as_the_one_instruction_form_does(tmp_path, capsys, monkeypatch):
    import io
    out = fake_run(tmp_path, MEMO)
    instructions = ["Name a primary color.", "Capital of Italy?"]
    alone = []
    for instruction in instructions:
        code, stdout, _ = run(capsys, "generate", "--out", out, instruction, "--max-new-tokens", 12)
        alone.append(stdout.removesuffix("\n").replace("\n", "\\n"))
    assert code == 0 and len(set(alone)) == 2  # two different answers, so a mix-up would show
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(instructions) + "\n"))
    code, stdout, err = run(capsys, "generate", "--out", out, "--max-new-tokens", 12)
    assert code == 0 and stdout.splitlines() == alone and "Ctrl-D" not in err  # a pipe: nothing but answers
    monkeypatch.setattr(sft, "answer", lambda *args, **options: ["a list:\n1. red\n2. blue"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    _, stdout, _ = run(capsys, "generate", "--out", out)
    assert stdout == "a list:\\n1. red\\n2. blue\n" * 2  # one line per answer: its line breaks written as \n


def test_generate_on_standard_input_loads_the_model_once_however_many_lines_follow(tmp_path, capsys, monkeypatch):
    import io
    out = fake_run(tmp_path, MEMO)
    loads = []
    load = gpt.from_pretrained
    monkeypatch.setattr(gpt, "from_pretrained", lambda name: loads.append(name) or load(name))
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\nthree\nfour\n"))
    code, stdout, err = run(capsys, "generate", "--out", out, "--max-new-tokens", 2)
    assert code == 0, err
    assert len(stdout.splitlines()) == 4 and loads == [str(out)]


@pytest.mark.parametrize("edit", [{"epochs": "2"}, {"lr": "fast"}, {"colour": "red"}, {"style": "chatml"}])
def test_a_hand_edited_run_json_is_one_line_naming_the_folder(tmp_path, capsys, edit):
    out = fake_run(tmp_path, MEMO)
    settings = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**settings, **edit}))
    code, _, _ = run(capsys, "generate", "--out", out, "hi")
    assert isinstance(code, str) and code.startswith(f"error: {out}: holds no run that train wrote (") and "\n" not in code


def test_an_unwritable_out_is_found_before_training(tmp_path, capsys, small_data):
    (tmp_path / "taken").write_text("a file where the run folder would go")
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "taken")
    assert isinstance(code, str) and "cannot write the run folder" in code and "step 0" not in err
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "taken" / "run")
    assert isinstance(code, str) and "cannot write the run folder" in code and "step 0" not in err


def test_retraining_replaces_the_run_folder_as_a_whole(tmp_path, capsys, small_data):
    out = tmp_path / "run"
    old_umask = os.umask(0o027)
    try:
        assert run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out, "--epochs", 1)[0] == 0
        (out / "instruction-data-with-response.json").write_text("[]")  # the first run's responses
        (out / "instruction-data-with-response-scores.jsonl").write_text("")  # and their scores
        assert run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out, "--epochs", 1,
                   "--style", "phi3")[0] == 0
    finally:
        os.umask(old_umask)
    assert json.loads((out / "run.json").read_text())["style"] == "phi3"
    assert sorted(os.listdir(out)) == RUN_FOLDER
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o640  # the umask is honoured


def test_a_save_cut_short_leaves_the_previous_epoch_whole(tmp_path, capsys, small_data, monkeypatch):
    out = tmp_path / "run"
    assert run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out, "--epochs", 1)[0] == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    saved = []

    def full_disk_at_the_plot(path, text):  # the weights and config are staged, then the disk fills
        if path.endswith("loss.svg"):
            raise ValueError(f"cannot write {path}: No space left on device")
        saved.append(path)
        return write_text(path, text)
    write_text = gpt.write_text
    monkeypatch.setattr(gpt, "write_text", full_disk_at_the_plot)
    code, _, _ = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out, "--epochs", 1, "--seed", 7)
    assert "No space left" in code and saved  # it failed partway through a save
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # nothing of the new run


def test_out_of_memory_is_one_line_with_the_fix(tmp_path, capsys, small_data, monkeypatch):
    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(sft, "loss_and_backward", no_memory)
    code, _, _ = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "run")
    assert code == "error: out of memory: lower --batch-size (raise --grad-accum to keep the batch)"


def test_a_diverging_run_stops_without_writing_nan(tmp_path, capsys, small_data):
    code, _, _ = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "run",
                     "--lr", "1e30", "--eval-every", 1)
    assert isinstance(code, str) and "training diverged" in code and not (tmp_path / "run" / "run.json").exists()


def test_eval_whose_judge_fails_midway_keeps_its_scores_and_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    out = fake_run(tmp_path, [(f"Question {i}?", "", "Answer.") for i in range(30)])  # 3 test entries
    url, bodies = ollama(replies=["70"], fail_from=2)
    monkeypatch.setenv("OLLAMA_HOST", url)
    code, _, _ = run(capsys, "eval", "--out", out)
    path = out / "instruction-data-with-response.json"
    assert "HTTP 500" in code and f"score them with python sft.py judge {path}" in code
    url, bodies = ollama(replies=["90"])
    code, stdout, _ = run(capsys, "judge", path, "--url", url)
    assert code == 0 and len(bodies) == 2  # of the 3 test responses, the first score was kept


def test_eval_whose_journal_cannot_be_written_says_the_responses_are_saved(tmp_path, capsys, monkeypatch):
    out = fake_run(tmp_path, [(f"Question {i}?", "", "Answer.") for i in range(30)])  # 3 test entries
    url, bodies = ollama(replies=["70"])
    monkeypatch.setenv("OLLAMA_HOST", url)
    (out / "instruction-data-with-response-scores.jsonl").mkdir()  # the journal cannot be opened
    code, _, _ = run(capsys, "eval", "--out", out)
    path = out / "instruction-data-with-response.json"
    assert code.startswith("error: ") and "instruction-data-with-response-scores.jsonl" in code and "\n" not in code
    assert f"the responses are saved: score them with python sft.py judge {path}" in code
    assert len(json.loads(path.read_text())) == 3 and bodies == []


def test_a_message_with_line_breaks_still_ends_as_one_line():
    def fails():
        raise ValueError("cannot download http://x (SSH-2.0-OpenSSH_9.2\r\n): check the network")
    with pytest.raises(SystemExit) as e:
        sft.run_cli(fails)
    assert e.value.code == "error: cannot download http://x (SSH-2.0-OpenSSH_9.2 ): check the network"


def test_generate_samples_with_temperature_and_top_k_the_same_answer_for_the_same_seed(tmp_path, capsys):
    out = fake_run(tmp_path, MEMO)
    def answer(*flags):
        code, stdout, err = run(capsys, "generate", "--out", out, "Name a primary color.", "--max-new-tokens", 12, *flags)
        assert code == 0, err
        return stdout
    sampled = answer("--temperature", "0.8", "--top-k", "40", "--seed", "1")
    assert answer("--temperature", "0.8", "--top-k", "40", "--seed", "1") == sampled
    assert answer("--temperature", "0.8", "--top-k", "40", "--seed", "2") != sampled
    greedy = answer()
    assert answer("--temperature", "0") == greedy != sampled and answer("--seed", "5") == greedy  # greedy by default
    code, _, _ = run(capsys, "generate", "--out", out, "hi", "--top-k", "0")
    assert code == "error: --temperature must be 0 or more, and --top-k 1 or more"


def test_zero_is_a_seed_a_weight_decay_and_off_for_the_flags_whose_default_is_0():
    cfg = sft.TrainConfig(model="tiny", seed=0, weight_decay=0, warmup_steps=0, max_grad_norm=0, lora_rank=0)
    assert (cfg.seed, cfg.weight_decay) == (0, 0)
    with pytest.raises(ValueError, match="--epochs must be a positive number, not 0"):
        sft.TrainConfig(model="tiny", epochs=0)
