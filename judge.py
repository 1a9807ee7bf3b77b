"""Score responses with a local Ollama judge: prompt -> request -> parse -> aggregate.

A leaf: the standard library only. sft.py builds the prompts and runs it (python sft.py judge FILE)."""
import hashlib, http.client, json, os, re, sys, time, urllib.error, urllib.parse, urllib.request

JUDGE = "llama3"
# deterministic, as the book; num_predict caps a reply's length (the score comes first, reasons after)
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048, "num_predict": 512}
TIMEOUT = 300  # seconds for a whole reply; the first waits for Ollama to load the model, a minute or more
NETWORK_ERRORS = (OSError, http.client.HTTPException)  # refused, reset, timed out, not HTTP


def judge_prompt(prompt: str, output: str, response: str) -> str:
    """The book's scoring prompt, to the character (prompt: the alpaca prompt without its response marker)."""
    return (f"Given the input `{prompt}` and correct output `{output}`, score the model response `{response}`"
            f" on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")


# ---------------------------------------------------------------- request
def server(url=None) -> str:
    """url, else OLLAMA_HOST (host:port, [ipv6]:port or a full URL with a path), else http://localhost:11434."""
    url = url or os.environ.get("OLLAMA_HOST") or "localhost"
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if netloc.startswith(":") or not netloc:
        netloc = "127.0.0.1" + netloc  # ":11434" means this machine, as Ollama reads it
    if parts.port is None:
        netloc += ":11434"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _error_detail(raw: bytes) -> str:
    """The "error" of an Ollama error body, else the body itself, on one line."""
    text = raw.decode(errors="replace")
    try:
        detail = json.loads(text)["error"]
    except (ValueError, TypeError, KeyError):
        detail = text
    return " ".join(str(detail).split())[:300]


def _open(url: str, path: str, body=None, model=JUDGE, timeout=10):
    """POST body (or GET) url+path; Ollama's failures become one ValueError line."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = _error_detail(e.read())
        if e.code == 404 and "not found" in detail:
            raise ValueError(f"judge model {model} is not on the Ollama server at {url}: "
                             f"pull it with `ollama pull {model}`") from None
        raise ValueError(f"Ollama at {url} answered HTTP {e.code}: {detail}") from None
    except (*NETWORK_ERRORS, ValueError) as e:
        reason = " ".join(str(getattr(e, "reason", e)).split())
        raise ValueError(f"cannot reach Ollama at {url} ({reason}): start it with `ollama serve` "
                         "(install from https://ollama.com), or point OLLAMA_HOST / --url at it") from None


def preflight(model=JUDGE, url=None):
    """Is a server there, and is the judge model pulled? Answers in a second, before any scoring."""
    url = server(url)
    _open(url, "/api/version", model=model).close()
    with _open(url, "/api/tags", model=model) as r:
        raw = r.read()
    try:
        names = {m["name"] for m in json.loads(raw)["models"]}
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"Ollama at {url}: /api/tags sent no list of models ({raw[:80]!r})") from None
    if model not in names and f"{model}:latest" not in names:
        pulled = ", ".join(sorted(map(str, names))) or "none"
        raise ValueError(f"judge model {model} is not pulled on the Ollama server at {url} (it has {pulled}): run `ollama pull {model}`")


# ---------------------------------------------------------------- parse
def _reply_part(line: bytes, url: str) -> tuple:
    """One line of /api/chat's NDJSON -> (content, done); an error line or a malformed one raises ValueError."""
    try:
        part = json.loads(line)
    except ValueError:
        part = None
    if not isinstance(part, dict):
        raise ValueError(f"Ollama at {url} sent a reply that is not its chat API's JSON: {line[:80]!r}")
    if part.get("error") is not None:
        raise ValueError(f"Ollama at {url}: {part['error']}")
    done = part.get("done") is True
    message = part.get("message", {"content": ""} if done else None)
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise ValueError(f"Ollama at {url} sent a chat line without message content: {line[:80]!r}")
    return message["content"], done


def query(prompt: str, model=JUDGE, url=None, timeout=TIMEOUT) -> str:
    """One chat turn: the NDJSON stream (or one object when not streamed), whole, within timeout seconds."""
    url = server(url)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "options": OPTIONS}
    deadline = time.monotonic() + timeout
    text = ""
    try:
        with _open(url, "/api/chat", body, model, timeout) as r:
            for line in iter(lambda: r.readline(1 << 16), b""):  # a line is at most 64 KB
                if time.monotonic() > deadline:
                    raise TimeoutError("still streaming")
                if not line.strip():
                    continue
                content, done = _reply_part(line, url)
                text += content
                if done:
                    return text
    except NETWORK_ERRORS as e:  # a stall, or a reply that would not end
        raise ValueError(f"Ollama at {url} did not finish a reply within {timeout}s ({e}); a cold model load "
                         "can take a minute: try again, or raise --timeout") from None
    raise ValueError(f"Ollama at {url} cut a reply off before its last (done) line; try again")


NUMBER = r"(-?\d+(?:\.\d+)?)(?!\w|\.\d)"  # 85, 8.5, -5; not the 1 of 1e3
SCALE = re.compile(r"\b[01]\s*(?:to|-|–)\s*100\b", re.IGNORECASE)  # "0 to 100", "0-100": the scale, not a score
FRACTION = re.compile(NUMBER + r"\s*(?:/|out of)\s*(\d+)\b", re.IGNORECASE)  # 85/100, 8 out of 10
AFTER_WORD = re.compile(r"\b(?:score|rating|rate|give)\D{0,30}?" + NUMBER, re.IGNORECASE)


def parse_score(reply: str):
    """The 0-100 score in a judge's reply, else None. Read in this order: a reply that is only a number;
    a number before "/N" or "out of N" (scaled: 8/10 is 80); the number after score/rating/rate/give;
    a number the reply starts with; the only number. Below 0 or above 100 is None."""
    text = SCALE.sub(" ", reply)
    score = None
    bare = re.fullmatch(r"\s*" + NUMBER + r"\s*\.?\s*", text)
    fraction = FRACTION.search(text)
    after_word = AFTER_WORD.search(text)
    leading = re.match(r"\s*" + NUMBER, text)
    numbers = re.findall(r"(?<![\w.])" + NUMBER, text)
    if bare:
        score = float(bare.group(1))
    elif fraction and float(fraction.group(2)) > 0:
        score = float(fraction.group(1)) * 100 / float(fraction.group(2))
    elif after_word:
        score = float(after_word.group(1))
    elif leading:
        score = float(leading.group(1))
    elif len(numbers) == 1:
        score = float(numbers[0])
    if score is None or not 0 <= score <= 100:
        return None
    if score.is_integer():
        return int(score)
    return score


# ---------------------------------------------------------------- aggregate
def _key(model: str, prompt: str) -> str:
    """What a journal line answers: this judge, this prompt (which holds the response)."""
    return hashlib.sha1(f"{model}\n{prompt}".encode()).hexdigest()[:16]


def read_journal(path: str) -> dict:
    """{key: score} from a journal of JSON lines; a line cut short by a kill is skipped (asked again)."""
    scores = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    scores[record["key"]] = record["score"]
                except (ValueError, TypeError, KeyError):
                    continue
    return scores


def score_all(prompts: list, journal: str, model=JUDGE, url=None, timeout=TIMEOUT) -> list:
    """Each prompt's score (None: unparseable). Each is appended to journal as it comes, so an interrupted
    run loses nothing and a rerun asks only what is missing."""
    try:
        f = open(journal, "a", encoding="utf-8")  # first: a folder we cannot write fails before any request
    except OSError as e:
        raise ValueError(f"cannot write {journal}: {e.strerror or e}") from None
    known = read_journal(journal)
    keys = [_key(model, p) for p in prompts]
    with f:
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
    """The judge, the average over the scored, and how many of how many were scored."""
    scored = [s for s in scores if s is not None]
    average = None
    if scored:
        average = sum(scored) / len(scored)
    return {"judge": model, "average": average, "scored": len(scored), "total": len(scores)}
