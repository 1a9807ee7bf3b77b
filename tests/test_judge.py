"""judge.py against a stand-in Ollama on 127.0.0.1: the request, both reply forms, parsing, every failure."""
import json, os, shutil, socket

import pytest

import judge
from conftest import FIXTURE, ollama

# The three sample judge replies of chapter 7 (abridged to their scoring sentences and first reasons).
BOOK_REPLIES = [
    'I\'d rate the model response "The car is as fast as a bullet." an 85 out of 100.\nHere\'s why:\n'
    "* The response uses a simile correctly, comparing the speed of the car to something else (in this case, a bullet).",
    "I'd score this model response as 40 out of 100.\nHere's why:\n* The model correctly identifies that thunderstorms "
    "are related to clouds (correctly identifying the type of phenomenon).",
    "I'd rate my own response as 95 out of 100. Here's why:\n* The response accurately answers the question by naming "
    "the author of 'Pride and Prejudice' as Jane Austen.",
]
ENTRY = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.", "output": "The car is as fast as lightning."}


def test_request_carries_the_model_the_books_prompt_and_the_three_options():
    url, bodies = ollama(replies=["85"])
    assert judge.query(judge.judge_prompt(ENTRY, "The car is as fast as a bullet."), "llama3", url) == "85"
    [body] = bodies
    assert body["model"] == "llama3" and body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert body["messages"] == [{"role": "user", "content": (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is very fast.` and "
        "correct output `The car is as fast as lightning.`, score the model response `The car is as fast as a bullet.` on "
        "a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")}]


@pytest.mark.parametrize("stream", [True, False])
def test_streamed_and_single_object_replies_both_parse(stream):
    url, _ = ollama(replies=["Score: 72"], stream=stream)
    assert judge.query("q", url=url) == "Score: 72"


@pytest.mark.parametrize("reply,score", [("85", 85), ("Score: 85", 85), ("85/100", 85),
                                         ("I'd rate the model response ... an 85 out of 100.", 85),
                                         (BOOK_REPLIES[0], 85), (BOOK_REPLIES[1], 40), (BOOK_REPLIES[2], 95),
                                         ("no number", None), ("150", None), ("-", None)])
def test_scores_parse_from_the_replies_judges_give(reply, score):
    assert judge.parse_score(reply) == score


def test_ollama_host_is_read_as_host_port_or_url(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "10.1.2.3:9999")
    assert judge.server() == "http://10.1.2.3:9999"
    monkeypatch.setenv("OLLAMA_HOST", "https://judge.example")
    assert judge.server() == "https://judge.example:11434"
    monkeypatch.delenv("OLLAMA_HOST")
    assert judge.server() == "http://localhost:11434"


def scored_file(tmp_path, responses):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{**ENTRY, "model_response": r} for r in responses]))
    return str(path)


def cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        judge.main([str(a) for a in argv])
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def test_unparseable_replies_are_counted_and_the_average_is_over_the_scored(tmp_path, capsys):
    url, bodies = ollama(replies=["80", "no idea", "60"])
    code, err = cli(capsys, scored_file(tmp_path, ["a", "b", "c", "   "]), "--url", url)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert code == 0 and len(bodies) == 3  # the empty response scores 0 without asking
    assert scores == {"judge": "llama3", "average": 140 / 3, "scored": 3, "total": 4, "scores": [80, None, 60, 0]}
    assert "Average score: 46.67 (3 of 4 scored)" in err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILURES = {
    "no server": (lambda: (f"http://127.0.0.1:{free_port()}", []), "cannot reach Ollama"),
    "model not pulled": (lambda: ollama(models=["mistral:latest"]), "ollama pull llama3"),
    "404 from chat": (lambda: ollama(status=404, error='model "llama3" not found, try pulling it first'), "ollama pull llama3"),
    "HTTP 500": (lambda: ollama(status=500, error="out of memory"), "HTTP 500: out of memory"),
    "error inside a 200 stream": (lambda: ollama(replies=["8"], error="runner crashed"), "runner crashed"),
    "reply never ends": (lambda: ollama(stall=True), "did not finish a reply within 1.0s"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_failures_are_one_clear_line_and_a_nonzero_exit(tmp_path, capsys, case):
    start, message = FAILURES[case]
    url, _ = start()
    code, _ = cli(capsys, scored_file(tmp_path, ["a"]), "--url", url, "--timeout", 1)
    assert isinstance(code, str) and code.startswith("error: ") and message in code and "\n" not in code
    assert not (tmp_path / "scores.json").exists()


def test_the_books_own_110_responses_score_in_full(tmp_path, capsys):
    shutil.copy(FIXTURE.parent / "book-responses.json", tmp_path / "instruction-data-with-response.json")
    url, bodies = ollama(replies=["50", "Score: 60", "70 out of 100"])
    code, err = cli(capsys, tmp_path / "instruction-data-with-response.json", "--url", url)
    assert code == 0 and "(110 of 110 scored)" in err and len(bodies) == 110
    assert json.loads((tmp_path / "scores.json").read_text())["average"] == pytest.approx(60, abs=0.5)
