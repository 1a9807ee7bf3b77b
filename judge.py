"""Scoring with a judge (the book's 7.8): the book's prompt and its request to Ollama; below the
divider the tool's: the judge's server, failures in one line, scores read out."""
JUDGE = "llama3"
TIMEOUT = 300  # seconds for a whole reply; the first also waits for Ollama to load the model

def judge_prompt(prompt: str, output: str, response: str) -> str:
    """The book's scoring prompt, to the character (prompt: format_input's, no marker)."""
    return (f"Given the input `{prompt}` and correct output `{output}`, "
            f"score the model response `{response}` on a scale from 0 to 100, "
            "where 100 is the best score. Respond with the integer number only.")

# ---------------- the request (7.8)
def query_model(prompt, model="llama3", url="http://localhost:11434/api/chat"):
    """The book's request: one chat turn with the Ollama endpoint at url, with the book's options
    for a deterministic reply; "stream": False answers one JSON object, not the book's stream."""
    import json, urllib.request  # the standard library's HTTP, where the book uses requests
    data = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}, "stream": False}
    request = urllib.request.Request(url, json.dumps(data).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())["message"]["content"]

# ================ the tool
import hashlib, http.client, json, os, re, sys, urllib.error, urllib.request
CHECK_TIMEOUT = 10  # seconds: a server that is up lists its models at once

def server(url=None) -> str:
    url = url or os.environ.get("OLLAMA_HOST") or "localhost:11434"
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")

def call(url: str, path: str, body, timeout: float):
    """GET (POST with a body) the OpenAI API at url (Ollama's: url/v1) -> its JSON or ValueError."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("OPENAI_API_KEY")
    if key and url.endswith("/v1"):  # a server the user named as OpenAI's, never Ollama's root
        headers["Authorization"] = f"Bearer {key}"
    api = url if url.endswith("/v1") else url + "/v1"
    judge = f"the judge at {url}"
    try:
        with urllib.request.urlopen(urllib.request.Request(api + path, data, headers),
                                    timeout=timeout) as response:
            return json.loads(response.read())  # a reply cut short is not JSON: never a score
    except urllib.error.HTTPError as e:  # {"error": {"message": ...}}
        if e.code in (401, 403):
            raise ValueError(f"{judge} refused the key (HTTP {e.code}): set OPENAI_API_KEY to a "
                             "key it takes") from None
        detail = e.read().decode(errors="replace")[:300]
        if key:
            detail = detail.replace(key, "[OPENAI_API_KEY]")
        raise ValueError(f"{judge} answered HTTP {e.code}: {detail}") from None
    except (TimeoutError, urllib.error.URLError) as e:
        if isinstance(getattr(e, "reason", e), TimeoutError):  # connected, then silence
            advice = "loading a model can take minutes: raise --timeout"
            if body is None:  # the check, which asks for no model
                advice = "is that the right address? (--url, OLLAMA_HOST)"
            raise ValueError(f"{judge} sent no reply within {timeout:g}s; {advice}") from None
        raise ValueError(f"cannot reach {judge} ({e.reason}): start it (`ollama serve`, "
                         "https://ollama.com), or point OLLAMA_HOST or --url there") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # a reset, a cut, not JSON
        raise ValueError(f"{judge} sent a broken reply ({type(e).__name__})") from None

def query(prompt: str, model=JUDGE, url=None, timeout=TIMEOUT) -> str:
    """query_model for the tool: OpenAI's chat protocol (Ollama speaks it too)."""
    url = server(url)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "seed": 123, "max_tokens": 512}
    reply = call(url, "/chat/completions", body, timeout)
    try:  # {"choices": [{"message": {"content": ...}}]}
        content = reply["choices"][0]["message"]["content"]
    except (TypeError, KeyError, IndexError):
        content = None
    if not isinstance(content, str):
        raise ValueError(f"the judge at {url} sent a chat reply without message content")
    return content

def preflight(model=JUDGE, url=None):
    """Is a server there, and does it have the judge? One quick request, before any work."""
    url = server(url)
    try:  # {"data": [{"id": ...}, ...]}
        names = [str(m["id"]) for m in call(url, "/models", None, CHECK_TIMEOUT)["data"]]
    except (TypeError, KeyError):
        raise ValueError(f"the judge at {url}: /models sent no list of models") from None
    if model not in names and f"{model}:latest" not in names:  # Ollama's tag; no prefix match
        raise ValueError(f"the judge at {url} has {', '.join(names) or 'none'}, not {model}: "
                         f"`ollama pull {model}`, or pick one with --judge")

NUMBER = r"(\d+(?:\.\d+)?)(?!\w|\s*(?:to|-|–)\s*\d)"  # 85, 8.5; not 1e3, nor the 0 of "0 to 100"
OUT_OF = r"(?:\s*(?:/|out of)\s*(\d+))?"  # "/10", " out of 100": the scale the number is on
BARE = re.compile(r"\A[\s*_]*" + NUMBER + OUT_OF + r"[\s*_.%]*(?:\n|$)", re.IGNORECASE)  # "**85**."
# after one of these words, within a clause: "Score: 85", "score of 85", "I would score it 40"
WORD = r"\b(?:score|scored|rate|rated|rating|give)\b[^\d.!?\n-]{0,30}?"
STATED = re.compile(WORD + NUMBER + OUT_OF, re.IGNORECASE)
PER_100 = re.compile(NUMBER + r"\s*(?:/|out of)\s*100\b", re.IGNORECASE)  # "85/100"

def parse_score(reply: str):
    """The 0-100 score a reply states: a first line that is a number ("**85**.", "8/10" as 80), a
    number after score, rate or give ("7 out of 10"), or N/100; two that differ, or none: None."""
    stated = STATED.findall(reply) + BARE.findall(reply)
    stated += [(number, "100") for number in PER_100.findall(reply)]
    # on the prompt's 0 to 100 unless stated ("7 out of 10"); "out of 0" is no score (-1)
    scores = {float(n) * 100 / int(d or 100) if int(d or 100) else -1.0 for n, d in stated}
    if len(scores) != 1 or not 0 <= min(scores) <= 100:  # none, a doubt, or off the scale
        return None
    score = scores.pop()
    return int(score) if score.is_integer() else score

def score_all(prompts: list, journal: str, model=JUDGE, url=None, timeout=TIMEOUT) -> list:
    """Each prompt's score (None: none stated), journaled as it comes: a rerun asks the rest."""
    keys = [hashlib.sha1(f"{model}\n{p}".encode()).hexdigest()[:16] for p in prompts]
    known = {}
    with open(journal, "a+", encoding="utf-8") as f:  # first: an unwritable folder fails at once
        f.seek(0)
        lines = f.read()
        for line in lines.splitlines():
            try:  # a line cut short by a kill is asked again
                record = json.loads(line)
                known[record["key"]] = parse_score(record["reply"])  # re-read by this parser
            except (ValueError, TypeError, KeyError):
                pass
        if lines and not lines.endswith("\n"):  # a kill mid-line: the next record starts anew
            f.write("\n")
        if any(key not in known for key in keys):
            preflight(model, url)
        try:
            for i, (key, prompt) in enumerate(zip(keys, prompts)):
                if key not in known:
                    reply = query(prompt, model, url, timeout)
                    known[key] = parse_score(reply)
                    f.write(json.dumps({"key": key, "score": known[key], "reply": reply}) + "\n")
                    f.flush()
                print(f"\rscoring {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
        finally:
            print(file=sys.stderr)  # ends the counter's line: what follows starts its own
    return [known[k] for k in keys]
