"""The judge against a stand-in Ollama on 127.0.0.1: the request, the reply, parsing, the journal, failures."""
import http.server, json, shutil, socket, subprocess, sys, time

import pytest
from hypothesis import given, strategies as st

import judge
import sft
from conftest import FIXTURE, ollama, openai_server, serve
from test_cli import run

# The three sample judge replies of chapter 7 (abridged to their scoring sentences and first reasons).
BOOK_REPLIES = [
    'I\'d rate the model response "The car is as fast as a bullet." an 85 out of 100.\nHere\'s why:\n'
    "* The response uses a simile correctly, comparing the speed of the car to something else (in this case, a bullet).",
    "I'd score this model response as 40 out of 100.\nHere's why:\n* The model correctly identifies that thunderstorms "
    "are related to clouds (correctly identifying the type of phenomenon).",
    "I'd rate my own response as 95 out of 100. Here's why:\n* The response accurately answers the question by naming "
    "the author of 'Pride and Prejudice' as Jane Austen.",
]
ENTRY = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
         "output": "The car is as fast as lightning."}


def responses_file(tmp_path, responses):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{**ENTRY, "model_response": r} for r in responses]))
    return path


def cli(capsys, *argv):
    """python sft.py judge ... in-process; returns (exit code, stdout, stderr)."""
    return run(capsys, "judge", *argv)


def test_request_goes_to_ollamas_openai_api_with_the_model_the_books_prompt_and_the_options(tmp_path, capsys):
    url, bodies = ollama(replies=["85"])
    code, _, err = cli(capsys, responses_file(tmp_path, ["The car is as fast as a bullet."]), "--url", url)
    assert code == 0, err
    [body] = bodies
    assert bodies.paths == ["/v1/chat/completions"]  # Ollama's root: its OpenAI-compatible API under /v1
    assert body["model"] == "llama3" and "stream" not in body  # one JSON object: a cut reply is not JSON
    assert {k: body[k] for k in ("temperature", "seed", "max_tokens")} == {"temperature": 0, "seed": 123, "max_tokens": 512}
    assert body["messages"] == [{"role": "user", "content": (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is very fast.` and "
        "correct output `The car is as fast as lightning.`, score the model response `The car is as fast as a bullet.` on "
        "a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")}]


def test_the_reply_is_the_message_content_of_one_json_object():
    url, _ = ollama(replies=["Score: 72"])
    assert judge.query("q", url=url) == "Score: 72"


def test_query_asks_a_v1_url_as_given_and_a_server_root_under_its_v1():
    url, bodies = openai_server(replies=["64"])
    assert judge.query("q", "gpt-4o-mini", url) == "64" and bodies.paths == ["/v1/chat/completions"]
    assert judge.query("q", "gpt-4o-mini", url + "/") == "64" and bodies.paths[-1] == "/v1/chat/completions"
    url, bodies = ollama(body=b'{"message": {"content": "8"}, "done": true}')  # Ollama's own shape: no choices
    with pytest.raises(ValueError, match=f"^the judge at {url} sent a chat reply without message content$"):
        judge.query("q", url=url)


SCORES = [  # (reply, score): what judges answer, and the rule's reading (judge.parse_score's docstring); a
    # number no word states as the score ("deserves 65 points", "a 0-100 scale: 65") is doubt: None
    ("85", 85), ("85.", 85), (" 100 ", 100), ("0", 0), ("72.5", 72.5), ("Score: 85", 85), ("**Score: 90**", 90),
    ("Rating: 92", 92), ("85/100", 85), ("Score: 90/100\nThe response is correct.", 90),
    ("I'd rate the model response ... an 85 out of 100.", 85), (BOOK_REPLIES[0], 85), (BOOK_REPLIES[1], 40),
    (BOOK_REPLIES[2], 95), ("On a scale from 0 to 100, I would score this response 85.", 85),
    ("Out of 100, I give it 85.", 85), ("The response has 2 errors. Score: 70", 70), ("On a 0-100 scale: 65", None),
    ("I'd give it a 95.", 95), ("My score is 88 (out of 100)", 88), ("60\n\nThe response lists 3 of the 4 items.", 60),
    ("The response deserves 65 points.", None), ("75%", 75), ("8/10", 80), ("I'd rate it 7/10", 70),
    ("3 out of 5", 60), ("-5", None), ("Score: -5", None), ("1e3", None), ("150", None), ("no number", None),
    ("-", None), ("8/00", None), ("85 out of 000", None), ("Somewhere between 70 and 80.", None), ("I cannot score this response.", None), ("", None),
]


@pytest.mark.parametrize("reply,score", SCORES)
def test_scores_parse_from_the_replies_judges_give(reply, score):
    assert judge.parse_score(reply) == score


CONTENT_NUMBERS = [  # replies whose explanations hold numbers: (reply, the score it states, or None in doubt)
    ("Score: 80. The formula KE = 1/2 mv^2 is stated correctly.", 80),
    ("95\n\nThe response is correct: 1/2 * base * height.", 95),
    ("Score: 85\n\nThe model answered 5 out of 5 parts.", 85),
    ("80\n\nThe model response gives 2 examples of mammals.", 80),
    ("Given that the response contains 3 errors, I would score it 40.", 40),
    ("90\n\nThe response is accurate. A score of 100 would require more detail.", None),  # two scores: doubt
    ("The response mentions 24/7 support. Score: 80", 80),
    ("I would rate it 7 out of 10.", 70),
]


@pytest.mark.parametrize("reply,score", CONTENT_NUMBERS)
def test_a_score_is_read_only_where_the_reply_states_it_never_from_numbers_in_its_content(reply, score):
    assert judge.parse_score(reply) == score


DISTRACTIONS = ["The formula is KE = 1/2 mv^2.", "It lists 3 of the 4 items.", "Support is 24/7.", "It gives 2 examples.",
                "Water boils at 100 degrees.", "Given 5 out of 5 parts, it is complete.", "F = 9/5 C + 32.",
                "The year was 1969.", "Between 60 and 70 words."]
STATED = ["Score: {}", "I would score it {}.", "{}/100", "I'd rate it {} out of 100.", "**{}**", "Rating: {}/100"]


@given(score=st.integers(0, 100), form=st.sampled_from(STATED), before=st.lists(st.sampled_from(DISTRACTIONS), max_size=3),
       after=st.lists(st.sampled_from(DISTRACTIONS), max_size=3))
def test_a_stated_score_among_sentences_with_numbers_gives_that_score_or_none(score, form, before, after):
    reply = "\n".join([*before, form.format(score), *after])
    assert judge.parse_score(reply) in (score, None)


def test_the_server_is_url_then_ollama_host_as_host_port_or_url_then_localhost(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "10.1.2.3:9999")
    assert judge.server() == "http://10.1.2.3:9999"
    assert judge.server("https://judge.example:8000/") == "https://judge.example:8000"
    monkeypatch.setenv("OLLAMA_HOST", "http://gateway:8080/ollama/")
    assert judge.server() == "http://gateway:8080/ollama"
    monkeypatch.delenv("OLLAMA_HOST")
    assert judge.server() == "http://localhost:11434"


def test_a_path_prefix_reaches_the_server_under_it():
    url, bodies = ollama(replies=["70"])
    assert judge.query("q", url=url + "/ollama/") == "70"
    assert bodies.paths == ["/ollama/v1/chat/completions"]


def test_scores_sit_beside_their_entries_in_a_file_named_after_the_responses(tmp_path, capsys):
    url, bodies = ollama(replies=["80", "no idea", "60", "10"])
    code, out, err = cli(capsys, responses_file(tmp_path, ["a", "b", "c", ""]), "--url", url)
    assert code == 0 and len(bodies) == 4, err  # every response is asked, the empty one too (as the book)
    result = json.loads((tmp_path / "r-scores.json").read_text())
    assert {k: result[k] for k in ("judge", "average", "scored", "total")} == \
        {"judge": "llama3", "average": 50, "scored": 3, "total": 4}
    assert [(e["model_response"], e["score"]) for e in result["entries"]] == [("a", 80), ("b", None), ("c", 60), ("", 10)]
    assert out == "Average score: 50.00 (3 of 4 scored)\n"  # the result on stdout; progress stays on stderr


def test_two_response_files_in_one_folder_keep_their_own_scores(tmp_path, capsys):
    url, _ = ollama(replies=["10"])
    first = responses_file(tmp_path, ["a"])
    second = first.rename(tmp_path / "other.json")
    cli(capsys, second, "--url", url)
    first = responses_file(tmp_path, ["a"])
    url, _ = ollama(replies=["90"])
    cli(capsys, first, "--url", url)
    assert json.loads((tmp_path / "other-scores.json").read_text())["average"] == 10
    assert json.loads((tmp_path / "r-scores.json").read_text())["average"] == 90


def test_an_interrupted_run_keeps_its_scores_and_a_rerun_asks_only_the_rest(tmp_path, capsys):
    path = responses_file(tmp_path, ["a", "b", "c", "d", "e"])
    url, bodies = ollama(replies=["50"], fail_from=4)  # HTTP 500 at the fourth
    code, _, _ = cli(capsys, path, "--url", url)
    assert "HTTP 500" in code and not (tmp_path / "r-scores.json").exists()
    assert len((tmp_path / "r-scores.jsonl").read_text().splitlines()) == 3
    url, bodies = ollama(replies=["50"])
    code, out, _ = cli(capsys, path, "--url", url)
    assert code == 0 and len(bodies) == 2  # a, b and c were kept; only d and e are asked
    assert out == "Average score: 50.00 (5 of 5 scored)\n"


def test_the_journal_keeps_each_replys_text_and_a_rerun_reads_the_score_from_it_without_asking(tmp_path, capsys):
    path = responses_file(tmp_path, ["a"])
    url, bodies = ollama(replies=["Score: 85\n\nThe model answered 5 out of 5 parts."])
    assert cli(capsys, path, "--url", url)[0] == 0
    journal = tmp_path / "r-scores.jsonl"
    [record] = [json.loads(line) for line in journal.read_text().splitlines()]
    assert record["reply"] == "Score: 85\n\nThe model answered 5 out of 5 parts." and record["score"] == 85
    journal.write_text(json.dumps({**record, "score": 100}) + "\n")  # as an older parser would have read it
    code, out, _ = cli(capsys, path, "--url", url)
    assert code == 0 and len(bodies) == 1 and out == "Average score: 85.00 (1 of 1 scored)\n"


def test_a_journal_whose_last_line_lost_its_newline_gets_the_next_record_on_a_line_of_its_own(tmp_path, capsys):
    path = responses_file(tmp_path, ["a", "b"])
    (tmp_path / "r-scores.jsonl").write_text('{"key": "0123456789abcdef", "sco')  # killed mid-write
    url, bodies = ollama(replies=["60"])
    assert cli(capsys, path, "--url", url)[0] == 0 and len(bodies) == 2
    code, out, _ = cli(capsys, path, "--url", url)
    assert code == 0 and len(bodies) == 2 and out == "Average score: 60.00 (2 of 2 scored)\n"  # nothing asked again


def test_with_nothing_scored_the_average_is_null_not_zero(tmp_path, capsys):
    url, _ = ollama(replies=["I cannot score this."])
    code, out, _ = cli(capsys, responses_file(tmp_path, ["a", "b"]), "--url", url)
    result = json.loads((tmp_path / "r-scores.json").read_text())
    assert code == 0 and result["average"] is None and out == "Average score: 0.00 (0 of 2 scored)\n"


def test_a_new_response_is_asked_again_not_read_from_the_journal(tmp_path, capsys):
    url, bodies = ollama(replies=["20"])
    cli(capsys, responses_file(tmp_path, ["first answer"]), "--url", url)
    url, bodies = ollama(replies=["70"])
    code, out, _ = cli(capsys, responses_file(tmp_path, ["second answer"]), "--url", url)
    assert len(bodies) == 1 and out == "Average score: 70.00 (1 of 1 scored)\n"


@pytest.mark.parametrize("listed", [["llama3"], ["mistral:latest", "llama3:latest"]])
def test_the_judge_is_there_when_the_server_lists_it_bare_or_as_latest(tmp_path, capsys, listed):
    url, bodies = ollama(models=listed)
    code, _, err = cli(capsys, responses_file(tmp_path, ["a"]), "--url", url)
    assert code == 0 and len(bodies) == 1, err


def test_another_judge_asks_every_question_again_instead_of_reading_the_first_judges_scores(tmp_path, capsys):
    path = responses_file(tmp_path, ["a", "b"])
    url, bodies = ollama(replies=["20"], models=["llama3:latest", "mistral:latest"])
    assert cli(capsys, path, "--url", url)[0] == 0 and len(bodies) == 2
    code, out, _ = cli(capsys, path, "--url", url, "--judge", "mistral")
    assert code == 0 and len(bodies) == 4 and [b["model"] for b in bodies[2:]] == ["mistral", "mistral"]
    assert cli(capsys, path, "--url", url, "--judge", "mistral")[0] == 0 and len(bodies) == 4  # now both are known


def test_a_folder_that_cannot_hold_the_scores_fails_before_the_first_request(tmp_path, capsys):
    url, bodies = ollama()
    (tmp_path / "r-scores.jsonl").mkdir()  # in the journal's place: any write there fails
    code, _, _ = cli(capsys, responses_file(tmp_path, ["a"]), "--url", url)
    assert code.startswith("error: ") and "r-scores.jsonl" in code and bodies == []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILURES = {
    "no server": (lambda: (f"http://127.0.0.1:{free_port()}", []), "cannot reach the judge at http://127.0.0.1:"),
    "model not pulled": (lambda: ollama(models=["mistral:latest"]), "has mistral:latest, not llama3: `ollama pull llama3`, or pick one with --judge"),
    "only other llama3 tags": (lambda: ollama(models=["llama3.1:latest", "llama3:70b"]),
                               "has llama3.1:latest, llama3:70b, not llama3: `ollama pull llama3`"),
    "404 from chat": (lambda: ollama(status=404, error='model "llama3" not found, try pulling it first'), "try pulling it"),
    "HTTP 500": (lambda: ollama(status=500, error="out of memory"), "answered HTTP 500: {\"error\": {\"message\": \"out of memory\""),
    "no reply in time": (lambda: ollama(stall=True), "sent no reply within 1s"),
    "a reply cut short": (lambda: ollama(body=b'{"message": {"content": "8'), "sent a broken reply"),
    "a reply that is not JSON": (lambda: ollama(body=b"<html>proxy login</html>"), "sent a broken reply"),
    "a reply that is a list": (lambda: ollama(body=b"[1, 2]"), "without message content"),
    "content null": (lambda: ollama(body=b'{"choices": [{"message": {"content": null}}]}'), "without message content"),
    "models not an object": (lambda: ollama(tags=[1, 2]), "/models sent no list of models"),
    "models not JSON": (lambda: ollama(tags=b"<html>"), "sent a broken reply"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_failures_are_one_clear_line_and_a_nonzero_exit(tmp_path, capsys, case):
    start, message = FAILURES[case]
    url, _ = start()
    began = time.monotonic()
    code, _, _ = cli(capsys, responses_file(tmp_path, ["a"]), "--url", url, "--timeout", 1)
    assert isinstance(code, str) and code.startswith("error: ") and message in code and "\n" not in code
    assert "the judge at http://127.0.0.1:" in code and time.monotonic() - began < 5
    assert not (tmp_path / "r-scores.json").exists()


def test_a_check_unanswered_in_time_asks_about_the_address_not_for_a_longer_timeout(tmp_path, capsys, monkeypatch):
    class Silent(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # connected, then nothing: a wrong port behind a proxy, say
            time.sleep(2)

        def log_message(self, *a):
            pass
    url, _ = serve(Silent)
    monkeypatch.setattr(judge, "CHECK_TIMEOUT", 0.5)
    code, _, _ = cli(capsys, responses_file(tmp_path, ["a"]), "--url", url, "--timeout", 100)
    assert code == f"error: the judge at {url} sent no reply within 0.5s; is that the right address? (--url, OLLAMA_HOST)"


def test_an_error_while_scoring_starts_on_its_own_line(tmp_path, capsys):
    url, _ = ollama(replies=["50"], fail_from=3)
    code, _, err = cli(capsys, responses_file(tmp_path, ["a", "b", "c"]), "--url", url)
    assert "HTTP 500" in code and err.endswith("scoring 2/3\n")  # the counter's line is ended


def test_the_books_own_110_responses_score_in_full(tmp_path, capsys):
    shutil.copy(FIXTURE.parent / "book-responses.json", tmp_path / "instruction-data-with-response.json")
    url, bodies = ollama(replies=["50", "Score: 60", "70 out of 100"])
    code, out, _ = cli(capsys, tmp_path / "instruction-data-with-response.json", "--url", url)
    assert code == 0 and "(110 of 110 scored)" in out and len(bodies) == 110
    result = json.loads((tmp_path / "instruction-data-with-response-scores.json").read_text())
    assert result["average"] == pytest.approx(60, abs=0.5)


def test_judge_py_is_a_leaf_that_imports_only_the_standard_library():
    code = "import sys, judge; print(sorted(m for m in sys.modules if m in ('sft', 'gpt', 'torch', 'tiktoken')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=FIXTURE.parents[2])
    assert p.stdout == "[]\n", p.stderr


# ---------------------------------------------------------------- an OpenAI-compatible judge (a --url ending in /v1)
def test_an_openai_compatible_server_is_asked_with_the_books_prompt_at_temperature_0_and_seed_123(tmp_path, capsys,
                                                                                                  monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    url, bodies = openai_server(replies=["85", "Score: 40\n\nThe answer names 2 of 3 parts."])
    path = responses_file(tmp_path, ["The car is as fast as a bullet.", "Fast."])
    code, out, err = cli(capsys, path, "--url", url, "--judge", "gpt-4o-mini")
    assert code == 0 and out == "Average score: 62.50 (2 of 2 scored)\n", err
    assert bodies.paths == ["/v1/chat/completions"] * 2
    prompt = judge.judge_prompt(sft.format_input(ENTRY), ENTRY["output"], "The car is as fast as a bullet.")
    assert bodies[0] == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}],
                         "temperature": 0, "seed": 123, "max_tokens": 512}
    assert not any("Authorization" in h for h in bodies.headers)  # no key set: none sent (local servers need none)


def test_the_key_goes_as_a_bearer_header_to_v1_only_and_into_no_output_or_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789secret")
    url, bodies = openai_server(key="sk-test-0123456789secret")
    path = responses_file(tmp_path, ["a"])
    code, out, err = cli(capsys, path, "--url", url, "--judge", "gpt-4o-mini")
    assert code == 0, err
    assert [h["Authorization"] for h in bodies.headers] == ["Bearer sk-test-0123456789secret"] * 2  # models, chat
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert "0123456789secret" not in out + err + written
    ollama_url, ollama_bodies = ollama()
    assert cli(capsys, responses_file(tmp_path, ["b"]), "--url", ollama_url)[0] == 0
    assert not any("Authorization" in h for h in ollama_bodies.headers)  # a root we add /v1 to gets no key


OPENAI_FAILURES = {
    "refused key": (dict(key="sk-right"), "refused the key (HTTP 401): set OPENAI_API_KEY"),
    "judge not listed": (dict(models=["gpt-4o", "gpt-4o-mini-2024"]), "has gpt-4o, gpt-4o-mini-2024, not gpt-4o-mini: "
                                                                       "`ollama pull gpt-4o-mini`, or pick one with --judge"),
    "rate limit": (dict(status=429, error="Rate limit reached for requests"), "answered HTTP 429: "),
    "server error": (dict(status=503, error="The server is overloaded"), "The server is overloaded"),
    "no content": (dict(body={"id": "x", "choices": []}), "sent a chat reply without message content"),
    "content null": (dict(body={"choices": [{"message": {"role": "assistant", "content": None}}]}), "without message"),
    "an error quoting the key": (dict(status=400, error="bad request for key sk-wrong-0123456789"), "[OPENAI_API_KEY]"),
}


@pytest.mark.parametrize("case", OPENAI_FAILURES)
def test_an_openai_compatible_servers_failures_are_one_line_and_exit_1_without_the_key(tmp_path, capsys, monkeypatch,
                                                                                      case):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-0123456789")
    options, message = OPENAI_FAILURES[case]
    url, bodies = openai_server(**options)
    code, out, err = cli(capsys, responses_file(tmp_path, ["a"]), "--url", url, "--judge", "gpt-4o-mini")
    assert isinstance(code, str) and code.startswith("error: ") and message in code and "\n" not in code
    assert "0123456789" not in code + out + err and not (tmp_path / "r-scores.json").exists()
    if case == "judge not listed":
        assert bodies == []  # said before any question


def test_a_rerun_on_another_server_asks_only_what_the_journal_lacks(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = responses_file(tmp_path, ["a", "b", "c"])
    url, _ = ollama(replies=["50"], fail_from=3)
    assert "HTTP 500" in cli(capsys, path, "--url", url)[0]
    url, bodies = openai_server(replies=["80"], models=["llama3"])  # Ollama's own /v1, say
    code, out, _ = cli(capsys, path, "--url", url)
    assert code == 0 and len(bodies) == 1 and out == "Average score: 60.00 (3 of 3 scored)\n"
