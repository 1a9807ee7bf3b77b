"""make book-check BOOK=DIR: each chapter function of gpt.py, sft.py and judge.py, pasted alone into the book's own
chapter-7 files, run in the book's calls and compared with the book's values.

DIR is the book's ch07/01_main-chapter-code folder. Its previous_chapters.py, gpt_instruction_finetuning.py and
ollama_evaluate.py are imported from there at run time; nothing of them is kept in this repository. They need
matplotlib, numpy, requests, tqdm and psutil, which the project does not (requirements-book.txt), so this is a
script, not a test: pytest does not collect it and `make test` does not run it.

How each function is pasted: its own text alone (decorators included) is taken from our file's chapter part (above
the line `# ================ the tool`) and exec'd into a copy of the namespace of the book file it belongs to, beside
the book's other functions, which it then calls. Its reference is the book's own code in that file: the function of
the same name; for `respond`, the loop over test_data in gpt_instruction_finetuning.main; for `judge_prompt`, the
prompt written inline in ollama_evaluate.generate_model_scores; for `format_input_phi`, exercise 7.1's prompt (not in
these files) as our README describes it. The model is the book's GPTModel, small and random, on the CPU.

Prints one table; exits 1 if any pasted function fails to run or any value differs from the book's."""
import ast, contextlib, copy, http.server, importlib, inspect, io, json, os, sys, textwrap, threading, time, types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO / "data" / "tiktoken-cache"))  # GPT-2's BPE files, offline

import tiktoken  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

TOKENIZER = tiktoken.get_encoding("gpt2")
ENTRIES = json.loads((REPO / "data" / "instruction-data.json").read_text())  # the book's 1,100
TRAIN, TEST, VAL = ENTRIES[:935], ENTRIES[935:1045], ENTRIES[1045:]  # the book's split: 85% / 10% / the rest
RESPONSES = json.loads((REPO / "tests" / "fixtures" / "book-responses.json").read_text())  # TEST, answered
CONFIG = {"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_layers": 2, "n_heads": 2,
          "drop_rate": 0.0, "qkv_bias": True}  # the book's GPTModel, small enough for a CPU
DEVICE = torch.device("cpu")  # what the book's main() picks here

# our chapter function -> (our file, the book file it is pasted into)
PASTED = {"format_input": ("sft.py", "gpt_instruction_finetuning"),
          "format_input_phi": ("sft.py", "gpt_instruction_finetuning"),  # beside format_input, as in exercise 7.1
          "InstructionDataset": ("sft.py", "gpt_instruction_finetuning"),
          "custom_collate_fn": ("sft.py", "gpt_instruction_finetuning"),
          "calc_loss_batch": ("sft.py", "previous_chapters"),
          "calc_loss_loader": ("sft.py", "previous_chapters"),
          "train_model_simple": ("sft.py", "previous_chapters"),
          "respond": ("sft.py", "gpt_instruction_finetuning"),
          "generate": ("gpt.py", "previous_chapters"),
          "judge_prompt": ("judge.py", "ollama_evaluate"),
          "query_model": ("judge.py", "ollama_evaluate")}

# The lines a reader writes where the book's code is inline rather than a function.
# respond: in place of main()'s whole loop over test_data, two lines
RESPOND_CALL_SITE = ('for entry, response in zip(test_data, respond(model, test_data, tokenizer, device)):\n'
                     '    entry["model_response"] = response')
# judge_prompt: in place of the `prompt = (f"Given the input ...")` statement in generate_model_scores
JUDGE_CALL_SITE = 'prompt = judge_prompt(format_input(entry), entry["output"], entry[json_key])'


class Differs(Exception):
    """A pasted function gave a value other than the book's."""


# ---------------- the book's files, and pasting into them
def load_book(folder: Path) -> types.SimpleNamespace:
    """The book's three files, imported from folder. gpt_download (OpenAI's weights: TensorFlow and the network)
    is stood in by a module that refuses: the check uses a random GPTModel and never downloads."""
    def download_and_load_gpt2(*args, **kwargs):
        raise RuntimeError("gpt_download is stubbed by book_check.py: no weights are downloaded")
    sys.modules["gpt_download"] = types.ModuleType("gpt_download")
    sys.modules["gpt_download"].download_and_load_gpt2 = download_and_load_gpt2
    sys.path.insert(0, str(folder))
    names = ("previous_chapters", "gpt_instruction_finetuning", "ollama_evaluate")
    return types.SimpleNamespace(**{name: importlib.import_module(name) for name in names})


def chapter_part(our_file: str) -> str:
    text = (REPO / our_file).read_text()
    divider = text.find("\n# ================ the tool")
    if divider < 0:
        raise LookupError(f"{our_file} has no divider line")
    return text[:divider + 1]


def own_text(name: str, our_file: str) -> str:
    """name's own text in our_file's chapter part, decorators included (ast.get_source_segment drops them), after
    blank lines that keep its line numbers (a traceback then points into our file). tests/test_lifting.py uses it too."""
    chapter = chapter_part(our_file)
    for node in ast.parse(chapter).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            return "\n" * (first - 1) + "".join(chapter.splitlines(True)[first - 1:node.end_lineno])
    raise LookupError(f"{name} is not in {our_file}'s chapter part")


def paste(name: str, book) -> dict:
    """A copy of the namespace of name's book file, with name's own text alone exec'd into it (replacing the book's
    function of that name in the copy only; the book's other functions keep calling the book's)."""
    our_file, book_file = PASTED[name]
    namespace = dict(vars(getattr(book, book_file)))
    exec(compile(own_text(name, our_file), str(REPO / our_file), "exec"), namespace)
    return namespace


def book_copy(module, **names) -> dict:
    return {**vars(module), **names}


def statement(function, kind, contains: str) -> tuple:
    """(node, source): the innermost statement of that kind in function's dedented source whose text holds
    `contains`."""
    source = textwrap.dedent(inspect.getsource(function))
    found = [node for node in ast.walk(ast.parse(source))
             if isinstance(node, kind) and contains in ast.get_source_segment(source, node)]
    if not found:
        raise LookupError(f"no {kind.__name__} with {contains!r} in the book's {function.__name__}")
    return min(found, key=lambda node: len(ast.get_source_segment(source, node))), source


def statement_text(function, kind, contains: str) -> str:
    node, source = statement(function, kind, contains)
    return textwrap.dedent(ast.get_source_segment(source, node, padded=True))


def with_call_site(function, kind, contains: str, line: str) -> str:
    """function's source with the statement found as statement() finds it replaced by line, at its indentation."""
    node, source = statement(function, kind, contains)
    lines = source.splitlines(True)
    indent = lines[node.lineno - 1][:node.col_offset]
    return "".join(lines[:node.lineno - 1] + [indent + line + "\n"] + lines[node.end_lineno:])


# ---------------- comparing
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def difference(a, b, where: str):
    """None if a equals b exactly (tensors in dtype, shape and every element, floats bit for bit: -0.0 is not 0.0,
    NaN is NaN), else where and how they first differ: the index of the first differing element or character."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype} {list(a.shape)}, the book's {b.dtype} {list(b.shape)}"
        bits = BITS.get(a.dtype, a.dtype)  # floats compared as the integers of their bits
        unequal = a.view(bits) != b.view(bits)
        if not unequal.any():
            return None
        index = tuple(unequal.nonzero()[0].tolist())
        return f"{where}{list(index)}: {a[index].item()!r}, the book's {b[index].item()!r}"
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: {len(a)} items, the book's {len(b)}"
        return next(filter(None, (difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))), None)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a)}, the book's {sorted(b)}"
        return next(filter(None, (difference(a[k], b[k], f"{where}[{k!r}]") for k in a)), None)
    if isinstance(a, str) and isinstance(b, str) and a != b:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"{where}, from character {i}: {a[i:i + 40]!r}, the book's {b[i:i + 40]!r}"
    if isinstance(a, float) and isinstance(b, float) and a.hex() == b.hex():  # bit for bit, as above
        return None
    if type(a) is type(b) and not isinstance(a, float) and a == b:
        return None
    return f"{where}: {a!r:.60}, the book's {b!r:.60}"


def expect_same(ours: list, books: list, what: str) -> int:
    """Compare item by item; raise Differs naming the first difference. Returns the count."""
    if len(ours) != len(books):
        raise Differs(f"{what}: {len(ours)} values, the book's {len(books)}")
    for i, (a, b) in enumerate(zip(ours, books)):
        found = difference(a, b, f"{what} #{i}")
        if found:
            raise Differs(found)
    return len(ours)


# ---------------- the book's model and loaders
def book_model(book, seed=123, **config):
    torch.manual_seed(seed)
    return book.previous_chapters.GPTModel({**CONFIG, **config})


def ending_model(book, **config):
    """A random model whose end-of-text logit is raised, so its answers end after 0 to ~10 tokens, at varied
    lengths (the book's eos_id path): a random model alone practically never writes 50256."""
    model = book_model(book, **config)
    with torch.no_grad():
        model.out_head.weight[50256] = 0
        model.out_head.weight[50256, 0] = 1.0  # the logit is the final norm's unit 0 ...
        model.final_norm.shift[0] = 1.5  # ... moved up: it wins where that unit is high
    return model


def book_loaders(book, collate_fn, train_data, val_data, batch_size=8):
    """main()'s two loaders: the book's InstructionDataset, seed 123, training shuffled and cut to whole batches."""
    dataset = book.gpt_instruction_finetuning.InstructionDataset
    torch.manual_seed(123)
    train = DataLoader(dataset(train_data, TOKENIZER), batch_size=batch_size, collate_fn=collate_fn, shuffle=True,
                       drop_last=True, num_workers=0)
    val = DataLoader(dataset(val_data, TOKENIZER), batch_size=batch_size, collate_fn=collate_fn, shuffle=False,
                     drop_last=False, num_workers=0)
    return train, val


def book_collate(book, namespace=None):
    """main()'s `customized_collate_fn = partial(custom_collate_fn, ...)` line, run unchanged in namespace (a copy
    of gpt_instruction_finetuning's, which may hold our pasted custom_collate_fn), with main()'s device."""
    namespace = book_copy(book.gpt_instruction_finetuning) if namespace is None else namespace
    namespace["device"] = DEVICE
    exec(statement_text(book.gpt_instruction_finetuning.main, ast.Assign, "partial(custom_collate_fn"), namespace)
    return namespace["customized_collate_fn"]


def batches(loader, epochs=1, seed=123) -> list:
    torch.manual_seed(seed)  # the same shuffles for ours and the book's
    return [batch for _ in range(epochs) for batch in loader]


# ---------------- the checks: each returns what it compared, or raises Differs
def check_format_input(ours, book):
    book_fn = book.gpt_instruction_finetuning.format_input
    n = expect_same([ours["format_input"](e) for e in ENTRIES], [book_fn(e) for e in ENTRIES], "prompt")
    return f"{n:,} of {len(ENTRIES):,} prompts identical"


def phi3_prompt(entry):
    """Exercise 7.1's Phi-3 prompt, written here from our README: <|user|>, the instruction, the input if any."""
    return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry["input"] else "")


def check_format_input_phi(ours, book):
    n = expect_same([ours["format_input_phi"](e) for e in ENTRIES], [phi3_prompt(e) for e in ENTRIES], "prompt")
    return f"{n:,} of {len(ENTRIES):,} prompts identical to exercise 7.1's form (hand-written reference)"


def check_InstructionDataset(ours, book):
    mine = ours["InstructionDataset"](ENTRIES, TOKENIZER)
    books = book.gpt_instruction_finetuning.InstructionDataset(ENTRIES, TOKENIZER)
    expect_same([len(mine)], [len(books)], "len")
    n = expect_same(list(mine), list(books), "id list")
    return f"{n:,} id lists identical, and len()"


def check_custom_collate_fn(ours, book):
    collates = (book_collate(book, ours), book_collate(book))  # main()'s partial line, on ours and on the book's
    runs = []
    for collate in collates:
        train, val = book_loaders(book, collate, TRAIN, VAL)
        example = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])  # the chapter's example rows
        runs.append(batches(train, epochs=2) + batches(val, epochs=2) + [example])
    n = expect_same(*runs, "batch (inputs, targets)")
    return f"{n} batches bit-identical: 2 epochs of 116 training and 7 validation, and the chapter's example"


def check_calc_loss_batch(ours, book):
    model = book_model(book)
    train, _ = book_loaders(book, book_collate(book), TRAIN, VAL)
    results = {"ours": [], "book": []}
    for x, y in batches(train)[:3]:
        for side, calc in (("ours", ours["calc_loss_batch"]), ("book", book.previous_chapters.calc_loss_batch)):
            model.zero_grad(set_to_none=True)
            loss = calc(x, y, model, DEVICE)  # as train_model_simple calls it, then backward
            loss.backward()
            results[side].append([loss.detach()] + [p.grad for p in model.parameters()])
    n = expect_same(results["ours"], results["book"], "batch's loss and gradients")
    return f"loss and all {len(results['ours'][0]) - 1} gradient tensors bit-identical on {n} training batches"


def check_calc_loss_loader(ours, book):
    model = book_model(book).eval()
    train, val = book_loaders(book, book_collate(book), TRAIN, VAL)  # 116 and 7 batches
    empty = DataLoader([], batch_size=8, collate_fn=book_collate(book))
    calls = [(train, 5), (val, 5), (train, 2), (val, None), (empty, None)]  # main()'s two calls first

    def means(calc):
        found = []
        for loader, num_batches in calls:
            torch.manual_seed(123)  # the shuffled loader draws the same order for ours and the book's
            with torch.no_grad():  # as main() and evaluate_model call it
                found.append(calc(loader, model, DEVICE, num_batches=num_batches))
        return found
    n = expect_same(means(ours["calc_loss_loader"]), means(book.previous_chapters.calc_loss_loader), "mean")
    return f"{n} means bit-identical: num_batches 5 (main()'s: training, validation), 2, None (7); NaN when empty"


def check_train_model_simple(ours, book):
    # main()'s call on 40 training entries: 2 epochs of 5 steps, evaluated at steps 0 and 5, a sample after each
    runs = [book_training(book, fn, TRAIN[:40], VAL)
            for fn in (ours["train_model_simple"], book.previous_chapters.train_model_simple)]
    (lists, printed, weights), book_run = runs[0], runs[1]
    expect_same(list(lists), list(book_run[0]), "list (train_losses, val_losses, tokens_seen)")
    expect_same(printed, book_run[1], "printed line")
    expect_same(weights, book_run[2], "final weight")
    return (f"the 3 lists ({len(lists[0])} evaluations), {len(printed)} printed lines, {len(weights)} final weight "
            "tensors: identical (40 entries, 2 epochs of 5 steps, AdamW lr 5e-5, eval_freq 5, eval_iter 5)")


def book_training(book, train_fn, train_data, val_data):
    """main()'s training: its loaders and AdamW, seed 123, and its call of train_model_simple."""
    model = book_model(book)
    train_loader, val_loader = book_loaders(book, book_collate(book), train_data, val_data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.00005, weight_decay=0.1)
    torch.manual_seed(123)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lists = train_fn(model, train_loader, val_loader, optimizer, DEVICE, num_epochs=2, eval_freq=5, eval_iter=5,
                         start_context=book.gpt_instruction_finetuning.format_input(val_data[0]), tokenizer=TOKENIZER)
    return lists, out.getvalue().splitlines(), [p.detach() for p in model.state_dict().values()]


def check_generate(ours, book):
    pc = book.previous_chapters
    short = pc.text_to_token_ids("Every effort moves you", TOKENIZER)  # chapter 5's prompt
    long = pc.text_to_token_ids(book.gpt_instruction_finetuning.format_input(TEST[0]), TOKENIZER)  # main()'s
    plain, ending = book_model(book).eval(), ending_model(book).eval()
    calls = [(plain, short, {"eos_id": 50256}), (plain, long, {"eos_id": 50256}),  # main()'s call: greedy
             (plain, short, {"temperature": 1.4, "top_k": 25}),  # chapter 5's sampled call
             (plain, short, {"temperature": 1.0}),
             (plain, long, {"temperature": 0.7, "top_k": 50, "context_size": 8}),  # the context cropped
             (ending, short, {"eos_id": 50256}), (ending, long, {"eos_id": 50256}),  # stopped at end-of-text
             (ending, long, {"temperature": 1.0, "top_k": 50, "eos_id": 50256})]
    results = {"ours": [], "book": []}
    for model, prompt, kwargs in calls:
        for side, gen in (("ours", ours["generate"]), ("book", pc.generate)):
            torch.manual_seed(123)  # the same draws when sampling
            results[side].append(gen(model=model, idx=prompt, max_new_tokens=15,
                                     **{"context_size": CONFIG["context_length"], **kwargs}))
    n = expect_same(results["ours"], results["book"], "id tensor")
    stopped = sum(ids.shape[1] < prompt.shape[1] + 15 for ids, (_, prompt, _) in zip(results["book"], calls))
    return (f"{n} id tensors identical: greedy and sampled (seed 123, temperature, top_k), context 256 and 8, "
            f"{stopped} stopped at eos_id")


def check_respond(ours, book):
    """main()'s loop over test_data, taken from its source, against our call-site line run in its place, each with
    the names main() has there. Two models: one whose answers end at end-of-text, on 20 test entries, and one that
    never ends, with a 16-token context, on 1 entry: all 256 new tokens, the context cropped at every step."""
    loop = statement_text(book.gpt_instruction_finetuning.main, ast.For, '["model_response"]')
    answers = []
    for model, entries in ((ending_model(book), TEST[:20]), (book_model(book, context_length=16), TEST[:1])):
        names = {"model": model, "tokenizer": TOKENIZER, "device": DEVICE,
                 "BASE_CONFIG": {**CONFIG, "context_length": model.pos_emb.weight.shape[0]}}
        mine = {**ours, **names, "test_data": copy.deepcopy(entries)}
        books = book_copy(book.gpt_instruction_finetuning, **names, test_data=copy.deepcopy(entries))
        with contextlib.redirect_stderr(io.StringIO()):  # the book's tqdm bar
            exec(compile(RESPOND_CALL_SITE, "<the call-site line>", "exec"), mine)
            exec(compile(loop, "<main()'s loop>", "exec"), books)
        expect_same(mine["test_data"], books["test_data"], "test entry with its model_response")
        answers += [entry["model_response"] for entry in books["test_data"]]
    written = sum(map(bool, answers[:-1]))
    return (f"{len(answers)} of {len(answers)} model_response identical to main()'s loop (20 that end at end-of-text, "
            f"{written} of them not empty; 1 from a model that never ends: 256 new tokens)")


def check_judge_prompt(ours, book):
    """generate_model_scores as the book has it, and with our call-site line in place of its inline prompt, each
    run on the 110 test entries with their answers; query_model stands in as a recorder (it is checked below)."""
    scoring = book.ollama_evaluate.generate_model_scores
    ours_source = with_call_site(scoring, ast.Assign, "Given the input", JUDGE_CALL_SITE)
    prompts = {"ours": [], "book": []}
    for side, source, namespace in (("ours", ours_source, ours),
                                    ("book", inspect.getsource(scoring), book_copy(book.ollama_evaluate))):
        namespace["query_model"] = lambda prompt, model, seen=prompts[side]: seen.append(prompt) or "50"
        exec(source, namespace)
        with contextlib.redirect_stderr(io.StringIO()):  # the book's tqdm bar
            namespace["generate_model_scores"](copy.deepcopy(RESPONSES), "model_response")
    n = expect_same(prompts["ours"], prompts["book"], "prompt")
    return f"{n} of {len(RESPONSES)} prompts identical (the test entries with the book's answers)"


def check_query_model(ours, book):
    """Both against a stand-in Ollama: the same text back, the same path, model, messages and options."""
    url, received = stand_in_ollama()
    calls = [(RESPONSES[0]["instruction"], "llama3"), ("Rate it: `x`\n", "phi3"), ("ünï ✓", "llama3")]
    texts = {"ours": [], "book": []}
    for side, query in (("ours", ours["query_model"]), ("book", book.ollama_evaluate.query_model)):
        texts[side] = [query(prompt, model, url + "/api/chat") for prompt, model in calls]  # reply i to call i
    n = expect_same(texts["ours"], texts["book"], "reply text")
    ours_sent, books_sent = received[:len(calls)], received[len(calls):]
    expect_same([path for path, _ in ours_sent], [path for path, _ in books_sent], "path")
    # the one difference by design: ours asks "stream": false, the book's sends none and reads Ollama's stream
    expect_same([body.pop("stream", None) for _, body in ours_sent], [False] * n, "our 'stream'")
    expect_same([body for _, body in ours_sent], [body for _, body in books_sent], "request body")
    return (f"{n} reply texts identical; path, model, messages, options identical ('stream': false in ours; "
            "the book's streamed NDJSON)")


OLLAMA_REPLIES = ["85", "Score: 72\nThe response is `close`.", "Ünïcødé ✓ 90"]


def stand_in_ollama():
    """An Ollama /api/chat on 127.0.0.1: with "stream": false one JSON object; otherwise (Ollama's default, the
    book's request) NDJSON lines of a few characters each, then a last line with "done": true. Records (path,
    body) of each request."""
    received = []

    class Ollama(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, body))
            text = OLLAMA_REPLIES[(len(received) - 1) % len(OLLAMA_REPLIES)]  # both sides make 3 calls
            chunks = [text[i:i + 4] for i in range(0, len(text), 4)] if body.get("stream", True) else [text]
            lines = [{"model": body["model"], "message": {"role": "assistant", "content": c}, "done": False}
                     for c in chunks] + [{"model": body["model"], "message": {"role": "assistant", "content": ""},
                                          "done_reason": "stop", "done": True}]
            if not body.get("stream", True):
                lines = [{**lines[0], "done_reason": "stop", "done": True}]
            raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson" if len(lines) > 1 else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ollama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", received


CHECKS = {name: globals()[f"check_{name}"] for name in PASTED}
CALL_SITES = {"respond": "in place of main()'s loop: `" + "` / `".join(RESPOND_CALL_SITE.split("\n    ")) + "`",
              "judge_prompt": f"in place of generate_model_scores's `prompt = (...)`: `{JUDGE_CALL_SITE}`"}


# ---------------- the table
def run_one(name, book) -> tuple:
    """(ran as pasted, value equal, passed) for name's check."""
    try:
        namespace = paste(name, book)
    except Exception as error:  # our text alone does not even define it in the book's file
        return f"no: {type(error).__name__}: {error}", "-", False
    ran = "yes" + (f", {CALL_SITES[name]}" if name in CALL_SITES else "")
    try:
        return ran, "yes: " + CHECKS[name](namespace, book), True
    except Differs as error:
        return ran, f"NO: {error}", False
    except Exception as error:  # a NameError or the like: it needs something the book's file lacks
        return f"no: {type(error).__name__}: {error}", "-", False


def main(argv) -> int:
    if len(argv) != 2 or not (Path(argv[1]) / "gpt_instruction_finetuning.py").is_file():
        print("usage: book_check.py DIR  (DIR: the book's ch07/01_main-chapter-code folder, holding "
              "previous_chapters.py, gpt_instruction_finetuning.py and ollama_evaluate.py)", file=sys.stderr)
        return 1
    # One thread unless OMP_NUM_THREADS says otherwise: the model is tiny, its ops gain little from a second thread,
    # and on a shared machine OpenMP's threads wait on each other (busy 2 cores: 34 s with one thread, 121 s with two)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    start = time.perf_counter()
    book = load_book(Path(argv[1]).resolve())
    print(f"The book's files: {argv[1]} (torch {torch.__version__}, {torch.get_num_threads()} thread(s))\n")
    print("| function | ran as pasted | value equal |\n| --- | --- | --- |")
    failed = []
    for name in PASTED:
        ran, equal, passed = run_one(name, book)
        print(f"| `{name}` | {ran} | {equal} |", flush=True)
        failed += [] if passed else [name]
    print(f"\n{len(PASTED) - len(failed)} of {len(PASTED)} as the book; {time.perf_counter() - start:.0f} s")
    if failed:
        print("differs or fails: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
