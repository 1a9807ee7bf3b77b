"""Paste-clean: each chapter function, pasted with the module-level lines that define what it names (recursively), runs
in a namespace holding only what the book's chapter-7 script imports (plus math, which the README says a student may
add), with a model whose forward takes the token ids alone, as the book's GPTModel, in the book's own calls."""
import ast, builtins, dis, inspect, json, os, re, time
from functools import partial

import pytest
import tiktoken
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import gpt
import judge
import sft
from conftest import DATA

BOOK_SCRIPT = {"torch": torch, "nn": nn, "tiktoken": tiktoken, "json": json, "os": os, "re": re, "time": time,
               "partial": partial, "Dataset": Dataset, "DataLoader": DataLoader}
STUDENT_MAY_ADD = {"math": __import__("math")}
PASTED = ("format_input", "InstructionDataset", "collate", "calc_loss_batch", "calc_loss_loader", "train_model_simple",
          "generate", "respond", "judge_prompt")


def chapter_definitions(module) -> dict:
    """{name: source} of every module-level def, class and assignment above the file's divider line."""
    source = open(module.__file__).read()
    chapter = source[:source.index("# ================ the tool")]
    definitions = {}
    for node in ast.parse(chapter).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = ast.get_source_segment(chapter, node, padded=True)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                definitions[target.id] = ast.get_source_segment(chapter, node)
    return definitions


DEFINITIONS = {**chapter_definitions(judge), **chapter_definitions(gpt), **chapter_definitions(sft)}


def paste(names) -> dict:
    """What a student pastes for names: their text and, recursively, the chapter lines defining the names it uses."""
    wanted = []
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in wanted or name not in DEFINITIONS:
            continue
        wanted.append(name)
        todo += [n.id for n in ast.walk(ast.parse(DEFINITIONS[name])) if isinstance(n, ast.Name)]
    namespace = {**BOOK_SCRIPT, **STUDENT_MAY_ADD}
    order = list(DEFINITIONS)
    for name in sorted(wanted, key=order.index):  # in the files' order: constants before the functions using them
        exec(DEFINITIONS[name], namespace)
    return namespace


def globals_named(code) -> set:
    """The global names a function's code (and the code nested in it) loads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
    for constant in code.co_consts:
        if inspect.iscode(constant):
            names |= globals_named(constant)
    return names


def test_every_name_a_pasted_function_uses_is_the_book_scripts_or_pasted_with_it():
    for name in PASTED:
        namespace = paste([name])
        functions = [namespace[name]]
        if inspect.isclass(namespace[name]):
            functions = [f for f in vars(namespace[name]).values() if inspect.isfunction(f)]
        for function in functions:
            missing = globals_named(function.__code__) - set(namespace) - set(dir(builtins))
            assert not missing, (name, missing)


class BookLike(nn.Module):
    """The project's GPT behind a forward that takes the token ids alone, as the book's GPTModel's does."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, in_idx):
        return self.model(in_idx)


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(n_positions=1024, n_embd=32, n_layer=2, n_head=4))


def test_pasted_the_data_functions_take_the_books_calls_and_give_the_modules_results():
    data = json.loads(DATA.read_text())
    tokenizer = sft.tokenizer()
    lifted = paste(["format_input", "InstructionDataset", "collate"])
    assert [lifted["format_input"](e) for e in data] == [sft.format_input(e) for e in data]
    dataset = lifted["InstructionDataset"](data[:40], tokenizer)
    assert list(dataset) == list(sft.InstructionDataset(data[:40], tokenizer))
    collate_fn = partial(lifted["collate"], device="cpu", allowed_max_length=1024)  # the book's call
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate_fn, shuffle=False, drop_last=False, num_workers=0)
    ours = DataLoader(sft.InstructionDataset(data[:40], tokenizer), batch_size=8, collate_fn=sft.collate)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(loader, ours))


def test_pasted_the_loss_and_the_loop_train_the_books_kind_of_model_as_the_module_does():
    data = json.loads(DATA.read_text())[:30]
    tokenizer = sft.tokenizer()
    train_data, val_data, _ = sft.split(data)
    results = []
    for functions in (paste(["InstructionDataset", "collate", "train_model_simple", "calc_loss_loader", "format_input"]),
                      vars(sft)):
        model = BookLike(small_gpt(seed=1))
        collate_fn = partial(functions["collate"], device="cpu", allowed_max_length=1024)
        torch.manual_seed(123)
        train_loader = DataLoader(functions["InstructionDataset"](train_data, tokenizer), batch_size=8,
                                  collate_fn=collate_fn, shuffle=True, drop_last=True, num_workers=0)
        val_loader = DataLoader(functions["InstructionDataset"](val_data, tokenizer), batch_size=8,
                                collate_fn=collate_fn, shuffle=False, drop_last=False, num_workers=0)
        initial = functions["calc_loss_loader"](val_loader, model, "cpu", num_batches=5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        torch.manual_seed(123)
        curves = functions["train_model_simple"](model, train_loader, val_loader, optimizer, "cpu", num_epochs=1,
                                                 eval_freq=2, eval_iter=5,
                                                 start_context=functions["format_input"](val_data[0]),
                                                 tokenizer=tokenizer)
        results.append((initial, curves, model.model.wte.weight.detach().clone()))
    (initial, (train_losses, val_losses, tokens_seen), weights), module = results
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 2  # steps 0 and 2 of 3 (25 rows // 8)
    assert tokens_seen == sorted(tokens_seen) and val_losses[-1] < initial  # it trained
    assert (initial, (train_losses, val_losses, tokens_seen)) == module[:2] and torch.equal(weights, module[2])


def test_pasted_generate_and_the_answer_loop_answer_as_the_fast_batched_path_does():
    model = small_gpt(seed=2).eval()
    tokenizer = sft.tokenizer()
    lifted = paste(["generate", "respond", "judge_prompt", "format_input"])
    prompts = [[464, 3290, 318], [15496, 995], [40, 1101, 257, 1310, 286, 2068, 290]]
    for prompt in prompts:
        ids = lifted["generate"](BookLike(model), torch.tensor([prompt]), 12, context_size=1024, eos_id=50256)
        assert ids[0, len(prompt):].tolist() == gpt.generate_batch(model, [prompt], 12, eos_id=50256)[0]
    entries = json.loads(DATA.read_text())[935:938]
    answers = lifted["respond"](BookLike(model), entries, tokenizer, "cpu", max_new_tokens=10)
    assert answers == sft.answer(model, entries, tokenizer, max_new_tokens=10)
    prompt = lifted["judge_prompt"](lifted["format_input"](entries[0]), entries[0]["output"], answers[0])
    assert prompt == judge.judge_prompt(sft.format_input(entries[0]), entries[0]["output"], answers[0])


@pytest.mark.parametrize("temperature, top_k", [(0.8, 40), (1.5, None), (1.0, 1)])
def test_sampling_with_a_seed_gives_the_same_tokens_in_the_books_generate_and_the_fast_path(temperature, top_k):
    model = small_gpt(seed=3).eval()
    prompt = [464, 3290, 318, 257]
    torch.manual_seed(7)
    book = gpt.generate(model, torch.tensor([prompt]), 15, 1024, temperature, top_k)[0, len(prompt):].tolist()
    torch.manual_seed(7)
    fast = gpt.generate_batch(model, [prompt], 15, temperature, top_k)[0]
    assert book == fast
    greedy = gpt.generate_batch(model, [prompt], 15)[0]
    assert (fast == greedy) == (top_k == 1)  # top-1 sampling is greedy; the others wander off it
