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


def test_tiny_model_memorises_a_handful_of_entries_and_stops_by_itself(tmp_path, capsys):
    """Also exercises 7.1 and 7.2: the phi3 style and prompt masking are kept with the run and used by generate."""
    data, out = write_data(tmp_path / "d.json", MEMO), tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", data, "--out", out, "--epochs", 50,
                       "--batch-size", 2, "--lr", 2e-3, "--style", "phi3", "--mask-prompt", "--eval-every", 1000)
    assert code == 0, err
    settings = json.loads((out / "run.json").read_text())
    assert settings["style"] == "phi3" and settings["mask_prompt"] is True
    for instruction, given, answer in MEMO[:8]:  # the training split: the first 8 of 10
        code, stdout, _ = run(capsys, "generate", "--out", out, instruction, "--input", given, "--max-new-tokens", 30)
        assert (code, stdout) == (0, answer + "\n")  # verbatim through the phi3 prompt, and it stopped by itself


def test_a_local_checkpoint_trains_writes_the_run_directory_and_evaluates(tmp_path, capsys, monkeypatch):
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=96, n_embd=32, n_layer=2, n_head=4)), tmp_path / "base")
    data, out = str(tmp_path / "d.json"), tmp_path / "run"
    (tmp_path / "d.json").write_text(json.dumps(json.loads(DATA.read_text())[:40]))
    code, _, err = run(capsys, "train", "--model", tmp_path / "base", "--data", data, "--out", out, "--batch-size", 4, "--eval-every", 3)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "metrics.jsonl", "loss.svg", "run.json"} <= set(os.listdir(out))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 3, 6, 9, 12, 15, 16]  # 34 train rows // 4 = 8 steps an epoch
    assert all({"step", "epoch", "tokens", "train_loss", "val_loss", "seconds"} <= m.keys() for m in metrics)
    svg = ET.parse(out / "loss.svg").getroot()
    lines = {p.get("id"): p for p in svg.iter("{http://www.w3.org/2000/svg}polyline")}
    assert lines.keys() == {"train", "validation"} and lines["validation"].get("stroke-dasharray") != "none"
    assert len(lines["train"].get("points").split()) == len(metrics)  # a point per report
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert {"epoch 1", "epoch 2", "tokens seen", "optimizer step", "loss", "train", "validation"} <= set(texts)
    y_ticks = [float(t.text) for t in svg.iter("{http://www.w3.org/2000/svg}text")
               if t.get("text-anchor") == "end" and t.get("fill") != "gray"]
    losses = [m[k] for m in metrics for k in ("train_loss", "val_loss")]
    spread = max(losses) - min(losses)
    assert len(y_ticks) >= 3 and all(min(losses) - spread / 10 <= t <= max(losses) + spread / 10 for t in y_ticks)
    token_labels = [int(t.text.replace(",", "")) for t in svg.iter("{http://www.w3.org/2000/svg}text")
                    if t.get("fill") == "gray" and t.text.replace(",", "").isdigit()]
    assert token_labels[0] == 0 and max(token_labels) <= metrics[-1]["tokens"] and len(token_labels) >= 3
    url, bodies = ollama(replies=["Score: 80", "70", "I'd rate it 90 out of 100.", "no idea"])
    monkeypatch.setenv("OLLAMA_HOST", url)
    code, _, err = run(capsys, "eval", "--out", out)
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert len(responses) == 4 and all("model_response" in r for r in responses)
    scores = json.loads((out / "instruction-data-with-response-scores.json").read_text())
    asked = [e for e in scores["entries"] if e["model_response"].strip()]
    assert len(bodies) == len(asked) and code == 0, err
    got = [e["score"] for e in scores["entries"] if e["score"] is not None]
    assert scores["average"] == pytest.approx(sum(got) / len(got)) and scores["total"] == 4


@pytest.fixture
def small_data(tmp_path):
    return write_data(tmp_path / "d.json", MEMO)


ERRORS = {
    "missing data": (["train", "--model", "tiny", "--data", "{tmp}/nope.json"], "nope.json: cannot read"),
    "malformed data": (["train", "--model", "tiny", "--data", "{tmp}/bad.json"], "malformed JSON at line 1"),
    "too few entries": (["train", "--model", "tiny", "--data", "{data}", "--limit", "9"], "too few to split"),
    "unknown local model": (["train", "--model", "./no/such/model", "--data", "{data}"], "no such folder"),
    "vocabulary too small": (["train", "--model", str(FIXTURE), "--data", "{data}"], "has 512 tokens; the GPT-2 tokenizer needs 50257"),
    "negative epochs": (["train", "--model", "tiny", "--data", "{data}", "--epochs", "-1"], "--epochs must be a positive number"),
    "zero batch size": (["train", "--model", "tiny", "--data", "{data}", "--batch-size", "0"], "--batch-size must be a positive number"),
    "unavailable device": (["train", "--model", "tiny", "--data", "{data}", "--device", "tpu"], "--device tpu is not available here"),
    "zero learning rate": (["train", "--model", "tiny", "--data", "{data}", "--lr", "0"], "--lr must be a positive number"),
    "infinite learning rate": (["train", "--model", "tiny", "--data", "{data}", "--lr", "inf"], "--lr must be a positive"),
    "NaN LoRA alpha": (["train", "--model", "tiny", "--data", "{data}", "--lora-alpha", "nan"], "--lora-alpha must be"),
    "malformed device": (["train", "--model", "tiny", "--data", "{data}", "--device", "cpu:abc"], "--device cpu:abc is not available"),
    "nested data": (["train", "--model", "tiny", "--data", "{tmp}/deep.json"], "deep.json: the JSON is nested too deeply"),
    "every prompt masked away": (["train", "--model", "tiny", "--data", "{data}", "--mask-prompt", "--max-length", "20"],
                                 "no training row keeps a response token within --max-length 20"),
    "no answer tokens": (["generate", "--out", "{tmp}", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    "eval of an empty folder": (["eval", "--out", "{tmp}"], "holds no trained run"),
    "generate of an empty folder": (["generate", "--out", "{tmp}", "hi"], "holds no trained run"),
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
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "nobody/nothing" in p.stderr and "not found" in p.stderr
    assert not (tmp_path / "run").exists()


def test_eval_without_ollama_keeps_the_responses_and_says_how_to_score_later(tmp_path, capsys, monkeypatch):
    from test_judge import free_port
    data, out = write_data(tmp_path / "d.json", MEMO), tmp_path / "run"
    assert run(capsys, "train", "--model", "tiny", "--data", data, "--out", out, "--epochs", 1, "--batch-size", 4)[0] == 0
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")
    code, _, err = run(capsys, "eval", "--out", out)
    assert isinstance(code, str) and "cannot reach Ollama" in code and "ollama serve" in code
    assert f"python sft.py judge {out}/instruction-data-with-response.json" in code and "\n" not in code
    assert err.index("warning: cannot reach Ollama") < err.index("test responses in")  # said before generating
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
    for line in p.stderr:  # wait until the third epoch has been saved
        if line.startswith("epoch 3 sample"):
            break
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 1 and "Traceback" not in rest
    last = rest.strip().splitlines()[-1]
    kept = json.loads((out / "run.json").read_text())["epochs_done"]
    assert kept >= 2 and last == f"interrupted: {out} holds epoch {kept}"  # what was kept, truthfully
    assert sorted(os.listdir(out)) == ["config.json", "loss.svg", "metrics.jsonl", "model.safetensors", "run.json"]


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
    alone = [sft.respond(model, [e], sft.tokenizer(), max_new_tokens=8)[0] for e in entries]
    assert len(set(alone)) == 3  # distinct answers, so a mix-up would show
    assert sft.respond(model, entries, sft.tokenizer(), max_new_tokens=8) == alone
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")
    run(capsys, "eval", "--out", out)  # no judge: the responses (256 tokens each) are still written
    saved = json.loads((out / "instruction-data-with-response.json").read_text())
    assert [r["instruction"] for r in saved] == [e["instruction"] for e in entries]
    assert all(r["model_response"].startswith(a) for r, a in zip(saved, alone))  # each begins as its own answer


def test_training_caps_max_length_at_a_short_model_context(tmp_path, capsys):
    base = tmp_path / "base"
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=24, n_embd=32, n_layer=2, n_head=4)), base)
    data = write_data(tmp_path / "d.json", MEMO)  # alpaca prompts are over 40 tokens: longer than the context
    code, _, err = run(capsys, "train", "--model", base, "--data", data, "--out", tmp_path / "run", "--epochs", 1)
    assert code == 0, err
    assert "9 cut to --max-length 24" in err  # the train and validation rows
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["val_loss"] > 0 for m in metrics)


@pytest.mark.parametrize("edit,message", [({"epochs": "2"}, "run.json: epochs must be of type int, not '2'"),
                                          ({"lr": "fast"}, "run.json: lr must be of type float"),
                                          ({"colour": "red"}, "run.json: unknown setting 'colour'"),
                                          ({"style": "chatml"}, "run.json: --style chatml: not one of alpaca, phi3")])
def test_a_hand_edited_run_json_names_the_setting_that_is_wrong(tmp_path, capsys, edit, message):
    out = fake_run(tmp_path, MEMO)
    settings = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**settings, **edit}))
    code, _, _ = run(capsys, "generate", "--out", out, "hi")
    assert isinstance(code, str) and message in code and "holds no trained run" not in code


def test_a_bad_style_is_its_own_argparse_error(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--model", "tiny", "--style", "chatml", "--out", tmp_path / "run")
    assert code == 2 and "--style: invalid choice: 'chatml' (choose from alpaca, phi3)" in err.replace("'alpaca', 'phi3'", "alpaca, phi3")


def test_an_unwritable_out_is_found_before_training(tmp_path, capsys, small_data):
    (tmp_path / "taken").write_text("a file where the run folder would go")
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "taken")
    assert isinstance(code, str) and "is a file" in code and "initial loss" not in err
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "taken" / "run")
    assert isinstance(code, str) and "cannot write the run folder" in code and "initial loss" not in err


def test_a_second_training_into_the_same_out_is_refused(tmp_path, capsys, small_data):
    import fcntl
    out = tmp_path / "run"
    with open(f"{out}.lock", "w") as held:  # as a training in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out)
    assert isinstance(code, str) and "another training is writing" in code and not out.exists()


def test_retraining_replaces_the_run_folder_as_a_whole(tmp_path, capsys, small_data):
    out = tmp_path / "run"
    old_umask = os.umask(0o027)
    try:
        assert run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out, "--epochs", 1)[0] == 0
        (out / "instruction-data-with-response.json").write_text("[]")  # the first run's responses
        assert run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", out, "--epochs", 1,
                   "--style", "phi3")[0] == 0
    finally:
        os.umask(old_umask)
    assert json.loads((out / "run.json").read_text())["style"] == "phi3"
    assert sorted(os.listdir(out)) == ["config.json", "loss.svg", "metrics.jsonl", "model.safetensors", "run.json"]
    assert sorted(os.listdir(tmp_path)) == ["d.json", "run", "run.lock"]  # no staging or old folder left
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o640  # the umask is honoured
    assert run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", f"{out}/", "--epochs", 1)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["d.json", "run", "run.lock"]  # "run/" is the same folder


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")])
def test_out_of_memory_is_one_line_with_the_fix(tmp_path, capsys, small_data, monkeypatch, error):
    def no_memory(*args):
        raise error
    monkeypatch.setattr(sft, "loss_and_backward", no_memory)
    code, _, _ = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "run")
    assert code == "error: out of memory: lower --batch-size (raise --grad-accum to keep the batch)"


def test_a_diverging_run_stops_without_writing_nan(tmp_path, capsys, small_data):
    code, _, _ = run(capsys, "train", "--model", "tiny", "--data", small_data, "--out", tmp_path / "run",
                     "--lr", "1e30", "--eval-every", 1)
    assert isinstance(code, str) and "training diverged" in code and not (tmp_path / "run").exists()


def test_ctrl_c_while_torch_is_importing_is_one_line(tmp_path):
    import signal
    import time
    p = subprocess.Popen([sys.executable, "sft.py", "train", "--model", "tiny", "--out", str(tmp_path / "run")],
                         stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(sft.__file__))
    time.sleep(0.3)  # torch takes a second or more to import
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode != 0 and "Traceback" not in err


def test_a_swap_cut_between_its_renames_is_undone_on_ctrl_c(tmp_path):
    out = tmp_path / "run"
    (tmp_path / ".run.old").mkdir()  # save_run renamed the old run away, then the signal came
    (tmp_path / ".run.old" / "run.json").write_text(json.dumps({"epochs_done": 3}))
    assert sft.what_was_kept(str(out)) == f"{out} holds epoch 3"
    assert (out / "run.json").exists() and not (tmp_path / ".run.old").exists()


def test_eval_whose_judge_fails_midway_keeps_its_scores_and_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    out = fake_run(tmp_path, [(f"Question {i}?", "", "Answer.") for i in range(30)])  # 3 test entries
    url, bodies = ollama(replies=["70"], fail_from=2)
    monkeypatch.setenv("OLLAMA_HOST", url)
    code, _, _ = run(capsys, "eval", "--out", out)
    path = out / "instruction-data-with-response.json"
    assert "HTTP 500" in code and f"score them with python sft.py judge {path}" in code
    url, bodies = ollama(replies=["90"])
    code, stdout, _ = run(capsys, "judge", path, "--url", url)
    asked = [r for r in json.loads(path.read_text()) if r["model_response"].strip()]
    assert code == 0 and len(bodies) == len(asked) - 1  # the first score was kept


def test_a_message_with_line_breaks_still_ends_as_one_line():
    def fails():
        raise ValueError("cannot download http://x (SSH-2.0-OpenSSH_9.2\r\n): check the network")
    with pytest.raises(SystemExit) as e:
        sft.run_cli(fails)
    assert e.value.code == "error: cannot download http://x (SSH-2.0-OpenSSH_9.2 ): check the network"


def test_a_run_folder_left_between_the_renames_of_a_killed_save_is_restored(tmp_path, capsys):
    out = fake_run(tmp_path, MEMO)
    out.rename(tmp_path / ".run.old")  # as after SIGKILL between save_run's two renames
    code, stdout, _ = run(capsys, "generate", "--out", out, "hi", "--max-new-tokens", 3)
    assert code == 0 and stdout and (out / "run.json").exists()
