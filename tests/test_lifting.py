"""The chapter's functions lift into the book's notebook as they are: copied alone into a namespace that holds only
torch, tiktoken and the chapter's own constants, they compute what sft's own do, with a device given as a string."""
import ast, inspect, json

import pytest
import tiktoken
import torch
import torch.nn.functional as F

import sft
from conftest import DATA, tiny_model

LIFTED = ("format_prompt", "split", "tokenize", "collate", "loss_sum", "loss_and_backward")
CONSTANTS = ("IGNORE", "SPLIT", "STYLES")  # EOT is gpt.EOT in sft.py: a notebook writes its value, 50256, as the book


def lift():
    """The source of the chapter's constants and functions, run in a namespace of torch, F and tiktoken alone."""
    source = open(sft.__file__).read()
    tree = ast.parse(source)
    namespace = {"torch": torch, "F": F, "tiktoken": tiktoken, "EOT": 50256}
    for node in tree.body:
        assigned = isinstance(node, ast.Assign) and node.targets[0].id in CONSTANTS
        defined = isinstance(node, ast.FunctionDef) and node.name in LIFTED
        if assigned or defined:
            exec(ast.get_source_segment(source, node), namespace)
    return namespace


def test_the_chapters_functions_name_only_torch_tiktoken_and_the_chapters_own_constants_and_functions():
    allowed = {"torch", "F", "tiktoken", "EOT", *CONSTANTS, *LIFTED}
    for name in LIFTED:
        named = inspect.getclosurevars(getattr(sft, name)).globals
        assert set(named) <= allowed, (name, set(named) - allowed)


def test_lifted_prompts_split_and_tokens_are_the_modules_own():
    lifted = lift()
    entries = json.loads(DATA.read_text())
    for style in sft.STYLES:
        assert [lifted["format_prompt"](e, style) for e in entries] == [sft.format_prompt(e, style) for e in entries]
    assert lifted["split"](entries) == sft.split(entries)
    enc = sft.tokenizer()
    assert lifted["tokenize"](entries, enc, "phi3") == sft.tokenize(entries, enc, "phi3")


@pytest.mark.parametrize("options", [{}, {"max_length": 40, "mask_prompt": True}])
def test_lifted_collate_loss_and_gradients_are_the_modules_own_with_a_string_device(options):
    lifted = lift()
    rows = sft.tokenize(json.loads(DATA.read_text())[:5], sft.tokenizer())
    inputs, targets = lifted["collate"](rows, **options)
    expected = sft.collate(rows, **options)
    assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
    micro_batches = [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])]
    model = tiny_model(seed=3, vocab=50257, n_positions=512)
    loss, count = lifted["loss_and_backward"](model, micro_batches, "cpu")  # "cpu": as the book's code passes it
    lifted_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert (loss, count) == sft.loss_and_backward(model, micro_batches, torch.device("cpu"))
    assert all(torch.equal(a, p.grad) for a, p in zip(lifted_grads, model.parameters()))
    assert lifted["loss_sum"](model, inputs, targets, "cpu") == sft.loss_sum(model, inputs, targets, "cpu")
