"""Score responses with a local Ollama judge: prompt -> request -> parse -> aggregate.
A leaf, standard library only: sft.py builds the prompts and runs it (python sft.py judge FILE)."""
import hashlib, http.client, json, os, re, sys, time, urllib.error, urllib.parse, urllib.request

JUDGE = "llama3"
# deterministic, as the book; num_predict caps a reply's length (the score comes first)
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048, "num_predict": 512}
TIMEOUT = 300  # seconds for a whole reply; the first also waits for Ollama to load the model
NETWORK_ERRORS = (OSError, http.client.HTTPException)  # refused, reset, timed out, not HTTP

def judge_prompt(prompt: str, output: str, response: str) -> str:
    """The book's scoring prompt, to the character (prompt: alpaca, without the marker)."""
    return (f"Given the input `{prompt}` and correct output `{output}`, "
            f"score the model response `{response}` on a scale from 0 to 100, "
            "where 100 is the best score. Respond with the integer number only.")

# ---------------------------------------------------------------- request
def server(url=None) -> str:
    """url, else OLLAMA_HOST (host:port, [::1]:port, a URL with a path), else localhost:11434."""
    url = url or os.environ.get("OLLAMA_HOST") or "localhost"
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc if parts.port else parts.netloc + ":11434"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"

def _open(url: str, path: str, body=None, model=JUDGE, timeout=10):
    """POST body (or GET) to url + path; every failure is one ValueError line that names Ollama."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]  # Ollama's error bodies are {"error": "..."}
        except (ValueError, TypeError, KeyError):
            pass
        if e.code == 404 and "not found" in str(detail):
            raise ValueError(f"Ollama at {url} lacks model {model}: `ollama pull {model}`") from None
        raise ValueError(f"Ollama at {url} answered HTTP {e.code}: {detail}") from None
    except (*NETWORK_ERRORS, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"cannot reach Ollama at {url} ({reason}): start it with `ollama serve` "
                         "(https://ollama.com), or point OLLAMA_HOST / --url at it") from None

def preflight(model=JUDGE, url=None):
    """Is a server there, with the judge model pulled? Answers in a second, before any scoring."""
    url = server(url)
    with _open(url, "/api/tags", model=model) as r:
        raw = r.read()
    try:
        names = {m["name"] for m in json.loads(raw)["models"]}
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"Ollama at {url}: /api/tags sent no list of models") from None
    if model not in names and f"{model}:latest" not in names:
        pulled = ", ".join(sorted(map(str, names))) or "none"  # llama3.1 is not llama3
        raise ValueError(f"Ollama at {url} lacks model {model} (it has {pulled}): `ollama pull {model}`")

# ---------------------------------------------------------------- parse
def _reply_part(line: bytes, url: str) -> tuple:
    """One NDJSON line of /api/chat -> (content, done); an error or a malformed line raises."""
    try:
        part = json.loads(line)
    except ValueError:
        part = None
    if not isinstance(part, dict):
        raise ValueError(f"Ollama at {url} sent a reply that is not its chat API's JSON")
    if part.get("error") is not None:
        raise ValueError(f"Ollama at {url}: {part['error']}")
    done = part.get("done") is True
    message = part.get("message", {"content": ""} if done else None)  # done may come alone
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise ValueError(f"Ollama at {url} sent a chat line without message content")
    return message["content"], done

def query(prompt: str, model=JUDGE, url=None, timeout=TIMEOUT) -> str:
    """One chat turn, read whole (to its done line) within timeout seconds; streamed or not."""
    url = server(url)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "options": OPTIONS}
    deadline = time.monotonic() + timeout
    text = ""
    try:
        with _open(url, "/api/chat", body, model, timeout) as r:
            for line in iter(lambda: r.readline(1 << 16), b""):  # lines of at most 64 KB
                if time.monotonic() > deadline:
                    raise TimeoutError("still streaming")
                if line.strip():
                    content, done = _reply_part(line, url)
                    text += content
                    if done:
                        return text
    except NETWORK_ERRORS as e:  # a stall, or a reply that would not end
        raise ValueError(f"Ollama at {url} did not finish a reply within {timeout}s ({e}); a cold "
                         "model load can take a minute: try again, or raise --timeout") from None
    raise ValueError(f"Ollama at {url} cut a reply off before its last (done) line; try again")

NUMBER = r"(-?\d+(?:\.\d+)?)(?!\w|\.\d)"  # 85, 8.5, -5; not the 1 of 1e3
SCALE = re.compile(r"\b[01]\s*(?:to|-|–)\s*100\b", re.IGNORECASE)  # "0 to 100": the scale
FRACTION = re.compile(NUMBER + r"\s*(?:/|out of)\s*(\d+)\b", re.IGNORECASE)  # 85/100, 8 out of 10
AFTER_WORD = re.compile(r"\b(?:score|rating|rate|give)\D{0,30}?" + NUMBER, re.IGNORECASE)
LEADING = re.compile(r"\s*" + NUMBER)

def parse_score(reply: str):
    """The 0-100 score in a judge's reply, else None. In this order: a number before "/N" or
    "out of N", scaled (8/10 is 80); the number after score, rating, rate or give; the number
    the reply starts with; its only number. "0 to 100" is the scale, never a score; below 0 or
    over 100 is None."""
    text = SCALE.sub(" ", reply)
    fraction = FRACTION.search(text)
    match = AFTER_WORD.search(text) or LEADING.match(text)
    numbers = re.findall(r"(?<![\w.])" + NUMBER, text)
    if fraction and int(fraction.group(2)) > 0:
        score = float(fraction.group(1)) * 100 / int(fraction.group(2))
    elif match:
        score = float(match.group(1))
    elif len(numbers) == 1:
        score = float(numbers[0])
    else:
        return None
    if not 0 <= score <= 100:
        return None
    return int(score) if score.is_integer() else score

# ---------------------------------------------------------------- aggregate
def score_all(prompts: list, journal: str, model=JUDGE, url=None, timeout=TIMEOUT) -> list:
    """Each prompt's score (None: unparseable), appended to journal as it comes, so a rerun asks
    only what is missing. A key is the judge and the prompt, which holds the response."""
    keys = [hashlib.sha1(f"{model}\n{p}".encode()).hexdigest()[:16] for p in prompts]
    try:
        f = open(journal, "a+", encoding="utf-8")  # first: an unwritable folder fails before asking
    except OSError as e:
        raise ValueError(f"cannot write {journal}: {e.strerror or e}") from None
    with f:
        f.seek(0)
        known = {}
        for line in f:
            try:  # a line cut short by a kill is asked again
                record = json.loads(line)
                known[record["key"]] = record["score"]
            except (ValueError, TypeError, KeyError):
                pass
        if any(k not in known for k in keys):
            preflight(model, url)
        for i, (key, prompt) in enumerate(zip(keys, prompts)):
            if key not in known:
                known[key] = parse_score(query(prompt, model, url, timeout))
                f.write(json.dumps({"key": key, "score": known[key]}) + "\n")
                f.flush()
            print(f"\rscoring {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return [known[k] for k in keys]

def summary(scores: list, model=JUDGE) -> dict:
    """The judge, the average over the scored entries, how many were scored, of how many."""
    scored = [s for s in scores if s is not None]
    average = sum(scored) / len(scored) if scored else None
    return {"judge": model, "average": average, "scored": len(scored), "total": len(scores)}
