"""Paste-clean: each function of a chapter part (gpt.py, sft.py, judge.py above their divider line
`# ================ the tool`) that carries a name of the book's chapter-7 code is self-contained -- its own
text alone, decorators included, exec'd into a namespace standing for the book's file that holds the
function it replaces, runs there with the book's other names -- and, called as the book calls it, gives the
book's value.

The book's neighbours below are stand-ins written here from the chapter's description (not the book's code,
which the tests never read). They are what a pasted function meets in its book file, and the references it is
compared with: a pasted function replaces the stand-in of its own name in a fresh copy of the namespace."""
import builtins, dis, inspect, json, math, os, re, time
from functools import partial

import pytest
import tiktoken
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import book_check  # make book-check's script: how a chapter function's own text is read
import gpt
import judge
import sft
from conftest import DATA

ENTRIES = json.loads(DATA.read_text())  # the book's 1,100
TOKENIZER = sft.load_tokenizer()
CONTEXT = 256  # the stand-in GPTModel's context: not GPT-2's 1024, so a function must read the model's


# ---------------- the book's neighbours: gpt_instruction_finetuning.py (exercise_experiments.py's phi prompt)
def format_input(entry):
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            f"the request.\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


def format_input_phi(entry):  # exercise 7.1
    return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry["input"] else "")


def training_text(entry, phi=False):
    if phi:
        return format_input_phi(entry) + f"\n<|assistant|>:\n{entry['output']}"
    return format_input(entry) + f"\n\n### Response:\n{entry['output']}"


class InstructionDataset(Dataset):
    def __init__(self, data, tokenizer):
        self.data = data
        self.encoded_texts = [tokenizer.encode(training_text(entry)) for entry in data]

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def masked_items(data, tokenizer):
    """Exercise 7.2's dataset items: (instruction_length, ids)."""
    return [(len(tokenizer.encode(format_input(e))), tokenizer.encode(training_text(e))) for e in data]


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu"):
    """Id lists, or exercise 7.2's pairs. The mask goes by VALUE: every end-of-text target but the first."""
    longest = max(len(item[1] if isinstance(item, tuple) else item) for item in batch) + 1
    inputs, targets = [], []
    for item in batch:
        ids = item[1] if isinstance(item, tuple) else item
        padded = ids + [pad_token_id] * (longest - len(ids))  # one end-of-text, then the padding
        x, y = torch.tensor(padded[:-1]), torch.tensor(padded[1:])
        ends = torch.nonzero(y == pad_token_id).flatten()
        y[ends[1:]] = ignore_index
        if isinstance(item, tuple):
            y[:item[0] - 1] = ignore_index  # exercise 7.2: no loss on the instruction
        inputs.append(x[:allowed_max_length])
        targets.append(y[:allowed_max_length])
    return torch.stack(inputs).to(device), torch.stack(targets).to(device)


def book_answers(model, test_data, tokenizer, device, max_new_tokens, context_size, phi=False):
    """main()'s loop over test_data (with exercise 7.1's prompt and marker when phi)."""
    prompt, marker = (format_input_phi, "<|assistant|>:") if phi else (format_input, "### Response:")
    answers = []
    for entry in test_data:
        input_text = prompt(entry)
        token_ids = generate(model=model, idx=text_to_token_ids(input_text, tokenizer).to(device),
                             max_new_tokens=max_new_tokens, context_size=context_size, eos_id=50256)
        generated_text = token_ids_to_text(token_ids, tokenizer)
        answers.append(generated_text[len(input_text):].replace(marker, "").strip())
    return answers


# ---------------- the book's neighbours: previous_chapters.py
class GPTModel(nn.Module):
    """Stands for the book's GPTModel: forward takes the token ids alone, pos_emb's rows are the context
    length. Inside, the project's GPT, tiny; the wrapper has no config and no wpe, as the book's has none."""
    def __init__(self, seed=0, context_length=CONTEXT):
        super().__init__()
        torch.manual_seed(seed)
        config = gpt.GPTConfig(vocab_size=50257, n_positions=context_length, n_embd=32, n_layer=2, n_head=4)
        self._gpt = gpt.GPT(config)
        self.modes = []  # model.training at each forward: the book's loop trains, then evaluates in eval mode
        self.grad_modes = []  # torch.is_grad_enabled() at each forward: the book generates under no_grad

    @property
    def pos_emb(self):
        return self._gpt.wpe

    def forward(self, in_idx):
        self.modes.append(self.training)
        self.grad_modes.append(torch.is_grad_enabled())
        return self._gpt(in_idx)


def text_to_token_ids(text, tokenizer):
    return torch.tensor(tokenizer.encode(text, allowed_special={"<|endoftext|>"})).unsqueeze(0)


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def generate_text_simple(model, idx, max_new_tokens, context_size):
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        idx = torch.cat((idx, logits.argmax(dim=-1, keepdim=True)), dim=1)
    return idx


@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]
        if top_k is not None:
            kth = torch.topk(logits, top_k).values[:, -1:]
            logits = torch.where(logits < kth, torch.tensor(float("-inf")), logits)
        if temperature > 0.0:
            logits = logits / temperature
            logits = logits - logits.max(dim=-1, keepdim=True).values
            idx_next = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
        else:
            idx_next = logits.argmax(dim=-1, keepdim=True)
        if idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def calc_loss_batch(input_batch, target_batch, model, device):
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """The mean of the first num_batches batches' means."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    losses = []
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i == num_batches:
            break
        losses.append(calc_loss_batch(input_batch, target_batch, model, device).item())
    return sum(losses) / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context):
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate_text_simple(model, encoded, 50, context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer):
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


class SGD:
    """A plain gradient step, standing for the book's AdamW: the loop only calls zero_grad() and step(), and
    torch.optim's first use imports torch._dynamo, seconds of this file's time."""
    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p -= self.lr * p.grad


def load_weights_into_gpt(gpt, params):
    raise NotImplementedError("the book's loader of OpenAI's weights: nothing here needs it")


# ---------------- the book's files as namespaces, and pasting into them
def previous_chapters() -> dict:
    names = ("GPTModel", "text_to_token_ids", "token_ids_to_text", "generate_text_simple", "generate",
             "calc_loss_batch", "calc_loss_loader", "evaluate_model", "generate_and_print_sample",
             "train_model_simple")
    imports = {"tiktoken": tiktoken, "torch": torch, "nn": nn, "Dataset": Dataset, "DataLoader": DataLoader}
    return {**imports, **{name: globals()[name] for name in names}}


def gpt_instruction_finetuning() -> dict:
    """The chapter's script, with exercise_experiments.py's format_input_phi (style="phi3" needs it)."""
    imports = {"json": json, "os": os, "re": re, "time": time, "partial": partial, "tiktoken": tiktoken,
               "torch": torch, "Dataset": Dataset, "DataLoader": DataLoader}
    own = {"format_input": format_input, "format_input_phi": format_input_phi,
           "InstructionDataset": InstructionDataset, "custom_collate_fn": custom_collate_fn}
    previous = ("calc_loss_loader", "generate", "GPTModel", "load_weights_into_gpt", "text_to_token_ids",
                "train_model_simple", "token_ids_to_text")
    return {**imports, **own, **{name: globals()[name] for name in previous}}


def ollama_evaluate() -> dict:
    """The chapter's scoring script, whose loop holds the judge's prompt."""
    return {"json": json, "format_input": format_input}  # and requests, psutil, tqdm: never called here


# each chapter function: the module whose chapter part holds it, and the book file holding the one it replaces
# (respond stands for main()'s answer loop, judge_prompt for the scoring
# loop's prompt)
PASTED = {**{name: (sft, gpt_instruction_finetuning)
             for name in ("format_input", "format_input_phi", "InstructionDataset", "custom_collate_fn", "respond")},
          **{name: (sft, previous_chapters)
             for name in ("calc_loss_batch", "calc_loss_loader", "train_model_simple")},
          "generate": (gpt, previous_chapters), "judge_prompt": (judge, ollama_evaluate),
          "query_model": (judge, ollama_evaluate)}


def chapter_part(module) -> str:
    return book_check.chapter_part(os.path.basename(module.__file__))


def own_text(name) -> str:
    """name's own text in its module's chapter part: what make book-check pastes into the book's files."""
    return book_check.own_text(name, os.path.basename(PASTED[name][0].__file__))


def paste(name) -> dict:
    """A fresh namespace of name's book file, with name's own text alone exec'd into it."""
    module, book_file = PASTED[name]
    namespace = book_file()
    exec(compile(own_text(name), module.__file__, "exec"), namespace)
    return namespace


def pasted(name):
    return paste(name)[name]


def names_in(code, opname) -> set:
    """The names a function's code (and the code nested in it) loads as globals (LOAD_GLOBAL) or imports."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == opname}
    for constant in code.co_consts:
        if inspect.iscode(constant):
            names |= names_in(constant, opname)
    return names


# ---------------- the rule's two halves: self-contained ...
def test_each_book_name_is_defined_in_its_modules_chapter_part_and_is_what_the_module_runs():
    for name, (module, _) in PASTED.items():
        own_text(name)  # raises unless above the divider
        first_line = inspect.getsourcelines(inspect.unwrap(getattr(module, name)))[1]
        assert first_line <= chapter_part(module).count("\n"), f"{module.__name__}.{name} is redefined below"


@pytest.mark.parametrize("name", PASTED)
def test_a_pasted_function_loads_no_global_but_its_book_files_names_and_builtins(name):
    namespace = paste(name)  # a NameError here: its decorators or defaults need something of ours
    thing = namespace[name]
    functions = [thing]
    if inspect.isclass(thing):  # its methods
        functions = [f for f in vars(thing).values() if inspect.isfunction(f)]
    for function in map(inspect.unwrap, functions):  # under torch.no_grad's wrapper, the pasted code
        assert function.__globals__ is namespace
        missing = names_in(function.__code__, "LOAD_GLOBAL") - set(namespace) - set(dir(builtins))
        assert not missing, f"{name} needs {missing}, which its book file lacks"
        imported = names_in(function.__code__, "IMPORT_NAME") & {"gpt", "sft", "judge"}
        assert not imported, f"{name} imports {imported}"


# ---------------- ... and the book's value in the book's call
def test_format_input_and_format_input_phi_pasted_give_the_books_prompts_for_every_entry():
    ours, phi = pasted("format_input"), pasted("format_input_phi")
    assert [ours(e) for e in ENTRIES] == [format_input(e) for e in ENTRIES]
    assert [phi(e) for e in ENTRIES] == [format_input_phi(e) for e in ENTRIES]
    assert any(not e["input"] for e in ENTRIES) and any(e["input"] for e in ENTRIES)  # both branches taken


def test_instruction_dataset_pasted_gives_the_books_ids_and_exercise_7_2s_pairs():
    ours = pasted("InstructionDataset")
    assert list(ours(ENTRIES, TOKENIZER)) == list(InstructionDataset(ENTRIES, TOKENIZER))
    assert list(ours(ENTRIES, TOKENIZER, mask_prompt=True)) == masked_items(ENTRIES, TOKENIZER)
    phi = [TOKENIZER.encode(training_text(e, phi=True)) for e in ENTRIES]
    assert list(ours(ENTRIES, TOKENIZER, style="phi3")) == phi
    assert len(ours(ENTRIES, TOKENIZER)) == len(ENTRIES)


def batches(loader):
    return [(x.tolist(), y.tolist()) for x, y in loader]


@pytest.mark.parametrize("allowed_max_length", [1024, 20])
def test_collate_pasted_in_the_books_partial_batches_as_custom_collate_fn(allowed_max_length):
    ids = list(InstructionDataset(ENTRIES, TOKENIZER))
    assert not any(50256 in row for row in ids)  # so the book's masking by value is masking by position
    ours = partial(pasted("custom_collate_fn"), device="cpu", allowed_max_length=allowed_max_length)  # the book's call
    book = partial(custom_collate_fn, device="cpu", allowed_max_length=allowed_max_length)
    for items in (ids, masked_items(ENTRIES, TOKENIZER)):
        assert batches(DataLoader(items, batch_size=8, collate_fn=ours)) == \
            batches(DataLoader(items, batch_size=8, collate_fn=book))
    example = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]  # the book's own example
    assert batches([ours(example)]) == batches([book(example)])


def test_calc_loss_batch_pasted_gives_the_books_loss_and_gradients():
    model = GPTModel(seed=1)
    inputs, targets = custom_collate_fn(masked_items(ENTRIES[:3], TOKENIZER))  # -100s: padding and prompts
    results = []
    for loss_fn in (pasted("calc_loss_batch"), calc_loss_batch):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(inputs, targets, model, "cpu")
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (ours, our_grads), (book, book_grads) = results
    assert torch.equal(ours, book)
    assert all(torch.equal(a, b) for a, b in zip(our_grads, book_grads))


def test_calc_loss_loader_pasted_is_the_mean_of_the_first_batches_means_and_nan_when_empty():
    model = GPTModel(seed=1)
    items = list(InstructionDataset(ENTRIES[:5], TOKENIZER))  # 74, 59, 44, 61 and 58 ids
    loader = DataLoader(items, batch_size=2, collate_fn=custom_collate_fn)  # 133, 105 and 58 targets
    means = [calc_loss_batch(x, y, model, "cpu").item() for x, y in loader]
    ours = pasted("calc_loss_loader")
    assert ours(loader, model, "cpu") == sum(means) / 3  # not the mean over all targets
    assert ours(loader, model, "cpu", num_batches=2) == (means[0] + means[1]) / 2
    assert ours(loader, model, "cpu", num_batches=99) == sum(means) / 3
    assert math.isnan(ours(DataLoader([], batch_size=4, collate_fn=custom_collate_fn), model, "cpu"))


def model_with_leftover_gradients(seed=1, context_length=CONTEXT):
    """A model holding a backward's gradients: the loop must zero them before its first step."""
    model = GPTModel(seed, context_length)
    inputs, targets = custom_collate_fn([TOKENIZER.encode("leftover gradients")])
    calc_loss_batch(inputs, targets, model, "cpu").backward()
    model.modes, model.grad_modes = [], []
    return model


def book_training(train_fn, train_items, val_items, capsys, context_length=CONTEXT, epochs=2, eval_freq=2,
                  eval_iter=2, start_context="Rewrite the sentence."):
    """The book's training call, with train_fn: (the curves, what it printed, the weights, the forwards'
    modes and the mode it left the model in)."""
    collate_fn = partial(custom_collate_fn, device="cpu", allowed_max_length=1024)
    torch.manual_seed(123)
    # the book's loaders, with batches of 4 (the book's 8 would double this file's slowest test)
    train_loader = DataLoader(train_items, batch_size=4, collate_fn=collate_fn, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_items, batch_size=4, collate_fn=collate_fn, shuffle=False, drop_last=False)
    model = model_with_leftover_gradients(context_length=context_length)
    torch.manual_seed(123)
    optimizer = SGD(model.parameters(), lr=0.5)
    capsys.readouterr()
    curves = train_fn(model, train_loader, val_loader, optimizer, "cpu", num_epochs=epochs,
                      eval_freq=eval_freq, eval_iter=eval_iter, start_context=start_context,
                      tokenizer=TOKENIZER)
    weights = [p.detach().clone() for p in model.parameters()]
    return curves, capsys.readouterr().out, weights, model.modes + [model.training]


def test_train_model_simple_pasted_trains_prints_and_returns_as_the_books_loop(capsys):
    shortest = sorted(InstructionDataset(ENTRIES, TOKENIZER), key=len)[:18]  # 40 to 43 tokens: quick steps
    train_items, val_items = shortest[:14], shortest[14:]  # 3 batches of 4 an epoch, 2 rows left: steps 0-5
    ours = book_training(pasted("train_model_simple"), train_items, val_items, capsys)
    book = book_training(train_model_simple, train_items, val_items, capsys)
    (train_losses, val_losses, tokens_seen), printed, weights, modes = ours
    assert len(train_losses) == 3 and printed.count("\n") == 5  # steps 0, 2 and 4; a sample after each epoch
    assert train_losses[-1] < train_losses[0]  # it trained
    assert (train_losses, val_losses, tokens_seen) == book[0]
    assert printed == book[1]
    assert all(torch.equal(a, b) for a, b in zip(weights, book[2]))
    assert modes == book[3]  # train mode for the steps, eval for the losses and the sample, train at the end


def peaked(model, scale=20.0):
    """model with its final LayerNorm's gain scaled up: logits spread over some units, not a random model's
    tenth of one, so that the temperature and top_k change what a seed samples."""
    with torch.no_grad():
        model._gpt.ln_f.weight.mul_(scale)
    return model


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.8, 40), (1.5, None), (1.0, 1)])
def test_generate_pasted_gives_the_books_ids_greedy_and_sampled_with_a_seed(temperature, top_k):
    model = peaked(GPTModel(seed=3).eval())
    prompt = torch.tensor([[464, 3290, 318, 257]])
    results = []
    for generate_fn in (pasted("generate"), generate):
        torch.manual_seed(7)
        results.append(generate_fn(model, prompt, 12, CONTEXT, temperature=temperature, top_k=top_k).tolist())
    assert results[0] == results[1] and len(results[0][0]) == 4 + 12
    assert not any(model.grad_modes)  # under the book's no_grad: the pasted text kept its decorator


def test_generate_pasted_reads_only_the_last_context_size_tokens_and_stops_at_eos():
    model = GPTModel(seed=5).eval()
    prompt = torch.tensor([[464, 3290, 318, 257, 1310, 286, 2068, 290]])
    ours = pasted("generate")
    cropped = ours(model, prompt, 6, context_size=5)
    assert cropped.tolist() == generate(model, prompt, 6, context_size=5).tolist()
    full = ours(model, prompt, 6, context_size=CONTEXT)
    assert cropped.tolist() != full.tolist()  # the crop mattered
    new = full[0, 8:].tolist()
    eos = next(token for token in new if token != new[0])  # the book stops before its first appearance
    stopped = ours(model, prompt, 6, CONTEXT, eos_id=eos)
    assert stopped.tolist() == generate(model, prompt, 6, CONTEXT, eos_id=eos).tolist()
    assert 8 < stopped.shape[1] < 8 + 6


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_respond_pasted_answers_as_the_books_loop_and_as_the_tools_batched_path(style):
    model = GPTModel(seed=2).eval()
    entries = ENTRIES[935:938]  # the first test entries
    answers = pasted("respond")(model, entries, TOKENIZER, "cpu", style=style, max_new_tokens=8)
    assert answers == book_answers(model, entries, TOKENIZER, "cpu", 8, CONTEXT, phi=style == "phi3")
    assert answers == sft.answer(model._gpt, entries, TOKENIZER, style, max_new_tokens=8)
    assert all(answers)


def test_pasted_respond_and_train_model_simple_read_the_context_size_from_the_model(capsys):
    model = GPTModel(seed=2, context_length=16).eval()  # every prompt is longer: generate must crop to 16
    entries = ENTRIES[935:937]
    answers = pasted("respond")(model, entries, TOKENIZER, "cpu", max_new_tokens=4)
    assert answers == book_answers(model, entries, TOKENIZER, "cpu", 4, context_size=16)
    rows = [TOKENIZER.encode(text) for text in ("Name a color.", "Add 2 and 3.", "Say hello.", "Spell cat.")]
    train = partial(book_training, train_items=rows, val_items=rows, capsys=capsys, context_length=16,
                    epochs=1, eval_freq=1, eval_iter=1, start_context=format_input(entries[0]))
    ours, book = train(pasted("train_model_simple")), train(train_model_simple)
    assert ours[:2] == book[:2]  # the curves, and the epoch's sample: 50 tokens, each from the last 16


def test_judge_prompt_pasted_gives_the_books_prompt():
    namespace = paste("judge_prompt")
    responses = ("85", "", "It is `x`.\n2", " ok ")
    entries = [{**e, "model_response": r} for e, r in zip(ENTRIES[935:939], responses)]
    assert any(not e["input"] for e in entries) and any(e["input"] for e in entries)
    for entry in entries:
        book = (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, score the "
                f"model response `{entry['model_response']}` on a scale from 0 to 100, where 100 is the best "
                "score. Respond with the integer number only.")
        prompt = namespace["format_input"](entry)  # the book's, in its loop
        assert namespace["judge_prompt"](prompt, entry["output"], entry["model_response"]) == book


def test_query_model_pasted_posts_the_books_request_to_the_url_it_is_given():
    from conftest import ollama
    url, bodies = ollama(replies=["Score: 72"])
    query_model = pasted("query_model")
    assert query_model("q", "llama3", url + "/api/chat") == "Score: 72"  # the book's call
    assert query_model("r", "phi3", url + "/elsewhere/api/chat") == "Score: 72"
    assert bodies.paths == ["/api/chat", "/elsewhere/api/chat"]  # the endpoint as given, nothing added
    book_options = {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert bodies[0] == {"model": "llama3", "messages": [{"role": "user", "content": "q"}],
                         "options": book_options, "stream": False}
    assert bodies[1]["model"] == "phi3"
    assert inspect.signature(query_model).parameters["url"].default == "http://localhost:11434/api/chat"


# ---------------- the tool's fast path gives the book's generate
def test_generate_batch_gives_the_books_generate_one_prompt_at_a_time():
    model = peaked(GPTModel(seed=4).eval())
    prompts = [[464, 3290, 318], [15496, 995], [40, 1101, 257, 1310, 286, 2068, 290]]  # unlike lengths

    def book_new_ids(prompt, eos_id=None, **sampling):  # the book's generate, one prompt, its new ids
        ids = generate(model, torch.tensor([prompt]), 15, CONTEXT, eos_id=eos_id, **sampling)
        return ids[0, len(prompt):].tolist()

    greedy = [book_new_ids(p) for p in prompts]
    assert gpt.generate_batch(model._gpt, prompts, 15) == greedy
    eos = greedy[0][5]  # the first row stops at its 6th new token or before, another runs on
    assert any(eos not in row for row in greedy)
    assert gpt.generate_batch(model._gpt, prompts, 15, eos_id=eos) == [book_new_ids(p, eos) for p in prompts]
    torch.manual_seed(7)
    book = book_new_ids(prompts[2], temperature=0.8, top_k=40)
    torch.manual_seed(7)
    assert gpt.generate_batch(model._gpt, [prompts[2]], 15, temperature=0.8, top_k=40) == [book]
    assert book != greedy[2]  # the sampling wandered off the greedy path
