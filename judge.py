"""Score model responses with a local Ollama judge: prompt -> request -> parse -> aggregate -> CLI."""
import argparse, json, os, re, sys, urllib.error, urllib.parse, urllib.request

from gpt import write_text
from sft import STYLES, format_prompt, load_entries, run_cli

JUDGE = "llama3"
OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}  # deterministic, as the book
TIMEOUT = 300  # seconds; the first reply waits for Ollama to load the model, which can take a minute or more

def judge_prompt(entry: dict, response: str) -> str:
    """The book's scoring prompt, to the character, so averages compare with its 50.32."""
    prompt = format_prompt(entry).removesuffix(STYLES["alpaca"][2])
    return (f"Given the input `{prompt}` and correct output `{entry['output']}`, score the model response `{response}`"
            f" on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")

def server(url=None) -> str:
    """url, else OLLAMA_HOST (host:port or a full URL), else http://localhost:11434."""
    url = url or os.environ.get("OLLAMA_HOST") or "localhost"
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    return f"{u.scheme}://{u.hostname or '127.0.0.1'}:{u.port or 11434}"

def _request(url, path, body=None, model=JUDGE, timeout=10):
    req = urllib.request.Request(url + path, json.dumps(body).encode() if body else None, {"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        detail = json.loads(detail).get("error", detail) if detail.startswith("{") else detail
        if e.code == 404 and "not found" in detail:
            raise ValueError(f"judge model {model} is not on the Ollama server at {url}: pull it with `ollama pull {model}`") from None
        raise ValueError(f"Ollama at {url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ValueError(f"cannot reach Ollama at {url} ({getattr(e, 'reason', e)}): start it with `ollama serve` "
                         "(install from https://ollama.com), or point OLLAMA_HOST / --url at it") from None

def preflight(model=JUDGE, url=None):
    """Is a server there, and is the judge model pulled? Answers in a second, before any scoring."""
    url = server(url)
    _request(url, "/api/version", model=model).close()
    with _request(url, "/api/tags", model=model) as r:
        names = {m.get("name") for m in json.load(r).get("models", [])}
    if model not in names and f"{model}:latest" not in names:
        raise ValueError(f"judge model {model} is not pulled on {url} (it has {', '.join(sorted(names)) or 'none'}): run `ollama pull {model}`")

def query(prompt: str, model=JUDGE, url=None, timeout=TIMEOUT) -> str:
    """One chat turn; reads the NDJSON stream (or the single object of a non-streamed reply)."""
    url, text = server(url), ""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "options": OPTIONS}
    try:
        with _request(url, "/api/chat", body, model, timeout) as r:
            for msg in (json.loads(line) for line in r if line.strip()):
                if "error" in msg:
                    raise ValueError(f"Ollama at {url}: {msg['error']}")
                text += msg.get("message", {}).get("content", "")
    except (TimeoutError, ConnectionError) as e:  # the socket waited `timeout` seconds for the next piece in vain
        raise ValueError(f"Ollama at {url} did not finish a reply within {timeout}s ({e}); a cold model load can "
                         "take a minute: try again, or raise --timeout") from None
    return text

def parse_score(reply: str):
    """The 0-100 score in a judge's reply ("85", "Score: 85", "85/100", "... an 85 out of 100."), else None."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*100\b", reply) or re.search(r"\d+(?:\.\d+)?", reply)
    score = float(m.group(1) if m.groups() else m.group()) if m else None
    return (int(score) if score.is_integer() else score) if score is not None and 0 <= score <= 100 else None

def score_file(path: str, model=JUDGE, key="model_response", url=None, timeout=TIMEOUT) -> dict:
    """Score every entry's response, write scores.json beside the file, print the average."""
    entries = load_entries(path)
    for i, e in enumerate(entries):
        if not isinstance(e.get(key), str):
            raise ValueError(f"{path}: entry {i} has no string {key!r}; pick the field with --key")
    preflight(model, url)
    scores = []
    for i, e in enumerate(entries):  # an empty response scores 0 without asking
        scores.append(parse_score(query(judge_prompt(e, e[key]), model, url, timeout)) if e[key].strip() else 0)
        print(f"\rscoring {i + 1}/{len(entries)}", end="", file=sys.stderr, flush=True)
    done = [s for s in scores if s is not None]
    result = {"judge": model, "average": sum(done) / len(done) if done else None, "scored": len(done),
              "total": len(scores), "scores": scores}
    write_text(os.path.join(os.path.dirname(os.path.abspath(path)), "scores.json"), json.dumps(result, indent=2))
    print(f"\nAverage score: {result['average'] or 0:.2f} ({len(done)} of {len(scores)} scored)", file=sys.stderr)
    return result

def main(argv=None):
    ap = argparse.ArgumentParser(description="Score model responses with a local Ollama judge (the book's prompt).")
    ap.add_argument("file", help="JSON list of entries with the response under --key (the book's format)")
    ap.add_argument("--model", default=JUDGE, help=f"Ollama judge model (default {JUDGE})")
    ap.add_argument("--key", default="model_response", help="field holding the response (default model_response)")
    ap.add_argument("--url", help="Ollama server (default $OLLAMA_HOST, else http://localhost:11434)")
    ap.add_argument("--timeout", type=float, default=TIMEOUT, help=f"seconds to wait for one reply (default {TIMEOUT})")
    args = ap.parse_args(argv)
    run_cli(score_file, args.file, args.model, args.key, args.url, args.timeout)

if __name__ == "__main__":
    main()
