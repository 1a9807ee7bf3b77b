"""Conversations: JSON Lines and {"messages": [...]} files, the chat template, targets on the assistant's turns only
(proven as properties over random conversations), answers at the last turn, the judge's parts, a chat that remembers."""
import io, itertools, json, re, sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import gpt
import judge
import sft
from conftest import DATA, ollama
from test_cli import run

ENC = sft.load_tokenizer()
EOT = 50256
EOT_TEXT = "<|endoftext|>"
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "conversations.jsonl"


# ---------------- the template, written out again here: the README's, independent of sft's code
def piece(message) -> str:
    if message["role"] == "assistant":
        return f"<|assistant|>:\n{message['content']}{EOT_TEXT}"
    return f"<|{message['role']}|>\n{message['content']}\n"


def rendered(messages) -> str:
    """The whole conversation as text: each assistant turn ends with <|endoftext|>, but for the last one's."""
    return "".join(map(piece, messages)).removesuffix(EOT_TEXT)


def ids_of(text) -> list:
    """Text with <|endoftext|> written in it -> ids, each <|endoftext|> as 50256 and the rest as plain text."""
    chunks = [ENC.encode_ordinary(chunk) for chunk in text.split(EOT_TEXT)]
    return sum(([EOT] + chunk for chunk in chunks[1:]), chunks[0])


def answer_spans(messages) -> list:
    """The byte spans of each assistant turn's content and its end-of-text, in rendered()'s text as UTF-8."""
    spans = []
    at = 0
    for m in messages:
        if m["role"] == "assistant":
            spans.append((at + len(b"<|assistant|>:\n"), at + len(piece(m).encode())))
        at += len(piece(m).encode())
    return spans


def token_starts(ids) -> list:
    """Where each token's first byte is in the ids' text as UTF-8 (a token may begin inside a character)."""
    return list(itertools.accumulate((len(ENC.decode_single_token_bytes(t)) for t in ids), initial=0))[:-1]


# contents: the template's own characters, leading and trailing whitespace (spaces, newlines, tabs), and multi-byte
# characters that BPE splits across tokens (accents, a combining accent, CJK, emoji and a skin tone); they never
# spell <|endoftext|>, so ids_of() reads them as the template does
BODY = st.text(alphabet="abxyz .,!?<|>:\n\u00e9\u00fc\u0301\u4e2d\u6587\U0001F600\U0001F44D\U0001F3FD", max_size=8)
SPACE = st.sampled_from(["", " ", "  ", "\n", "\n\n", " \n", "\n ", "\t"])
CONTENT = st.builds(lambda lead, body, trail: lead + body + trail, SPACE, BODY, SPACE)


@st.composite
def conversations(draw, content=CONTENT):
    """An optional system message first, then user and assistant turns in any order, the last one an assistant's."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(content)})
    roles = draw(st.lists(st.sampled_from(["user", "assistant"]), max_size=5)) + ["assistant"]
    return messages + [{"role": role, "content": draw(content)} for role in roles]


def collate(conversations_, mask_prompt, max_length=None):
    rows = [sft.chat_row(messages, ENC, mask_prompt) for messages in conversations_]
    collate_fn = sft.collate_turns if mask_prompt else sft.custom_collate_fn
    return collate_fn(rows, allowed_max_length=max_length)


# ---------------- the template and the loss, as properties
@given(conversations())
def test_a_conversation_is_the_template_written_out_with_50256_ending_each_assistant_turn_but_the_last(messages):
    answer, ids = sft.chat_row(messages, ENC, mask_prompt=True)
    assert ids == sft.chat_row(messages, ENC) == ids_of(rendered(messages)) and len(answer) == len(ids)


@given(conversations(), st.one_of(st.none(), st.integers(1, 60)))
def test_with_mask_prompt_the_targets_are_exactly_the_assistants_tokens_and_end_of_texts_unless_cut(messages, cut):
    inputs, targets = collate([messages], mask_prompt=True, max_length=cut)
    ids = ids_of(rendered(messages))
    starts = token_starts(ids)
    spans = answer_spans(messages)
    assistants = {j for j in range(1, len(ids)) if any(a <= starts[j] < b for a, b in spans)}  # begins in an answer
    expected = {j - 1 for j in assistants} | {len(ids) - 1}  # position j - 1 predicts token j; the last, 50256
    kept = {j for j in range(targets.shape[1]) if targets[0, j] != -100}
    assert kept == {j for j in expected if j < targets.shape[1]}  # (a) and (b): nothing else, and all unless cut
    for j in kept:
        assert targets[0, j] == (ids + [EOT])[j + 1]
    assert inputs[0].tolist() == ids[:targets.shape[1]]
    if cut is None:  # the targets, as text, are each answer and its end-of-text, but for one newline:
        learned = b"".join(ENC.decode_single_token_bytes(targets[0, j].item()) for j in sorted(kept))
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # an answer that opens with a newline followed by whitespace or by its end: GPT-2's pre-tokenizer makes the
        # marker's newline and that one a single token, "\n\n" (628), which begins in the marker, so is no target
        # (a marker is never one): the answer's first newline is never learned; no other character is lost
        answers = [a[1:] if re.match(r"\n(\s|$)", a) else a for a in answers]
        assert learned == "".join(a + EOT_TEXT for a in answers).encode()


@given(conversations(), st.one_of(st.none(), st.integers(1, 60)))
def test_without_mask_prompt_every_next_token_is_a_target_as_for_alpaca_rows(messages, cut):
    inputs, targets = collate([messages], mask_prompt=False, max_length=cut)
    ids = ids_of(rendered(messages))
    assert targets[0].tolist() == (ids[1:] + [EOT])[:targets.shape[1]]  # (c)
    assert inputs[0].tolist() == ids[:targets.shape[1]]


@given(st.lists(conversations(), min_size=2, max_size=4), st.booleans(), st.one_of(st.none(), st.integers(1, 60)))
def test_no_target_crosses_from_one_row_to_the_next(batch, mask_prompt, cut):
    inputs, targets = collate(batch, mask_prompt, cut)  # (d): each row is its own collate, padded
    for i, messages in enumerate(batch):
        alone_inputs, alone_targets = collate([messages], mask_prompt, cut)
        width = alone_targets.shape[1]
        assert torch.equal(targets[i, :width], alone_targets[0]) and (targets[i, width:] == -100).all()
        assert torch.equal(inputs[i, :width], alone_inputs[0]) and (inputs[i, width:] == EOT).all()


@given(CONTENT, CONTENT)
def test_a_one_turn_conversation_is_the_phi3_row_of_exercise_7_1(instruction, output):
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
    phi3 = sft.InstructionDataset([{"instruction": instruction, "output": output}], ENC, style="phi3")
    assert sft.chat_row(messages, ENC) == phi3[0]  # (e): the same ids, and so the same targets
    assert all(torch.equal(a, b) for a, b in zip(collate([messages], False), sft.custom_collate_fn([phi3[0]])))


def test_a_written_endoftext_in_a_message_stays_text_only_the_templates_turn_ends_are_50256():
    messages = [{"role": "system", "content": f"Say {EOT_TEXT} freely."}, {"role": "user", "content": EOT_TEXT},
                {"role": "assistant", "content": f"{EOT_TEXT}Done{EOT_TEXT}"}, {"role": "user", "content": "More?"},
                {"role": "assistant", "content": EOT_TEXT}]
    ids = sft.chat_row(messages, ENC)
    assert ids.count(EOT) == 1 and ids.index(EOT) == len(ENC.encode_ordinary(rendered(messages[:3])))  # turn 1's end
    assert ENC.decode(ids) == rendered(messages)  # the written ones are there, as the characters < | e n d ...
    _, targets = collate([messages], mask_prompt=True)
    assert (targets == EOT).sum() == 2  # each assistant turn's end, the last one collate's


# contents that write <|endoftext|>, whole or in parts, among other text
WRITTEN_EOT = st.lists(st.sampled_from([EOT_TEXT, EOT_TEXT, "<|", "endoftext", "|>", "a", " ", "\n"]),
                       max_size=4).map("".join)


@given(conversations(WRITTEN_EOT))
def test_50256_is_only_the_end_of_each_assistant_turn_however_often_the_messages_write_endoftext(messages):
    turns = sum(m["role"] == "assistant" for m in messages)
    ids = sft.chat_row(messages, ENC)
    assert ids.count(EOT) == turns - 1  # the last turn's is collate's
    assert ENC.decode(ids) == rendered(messages)
    _, targets = collate([messages], mask_prompt=True)
    assert (targets[0] == EOT).sum() == turns
    assert (collate([messages], mask_prompt=False)[1][0] == EOT).sum() == turns


# ---------------- files
def write_jsonl(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


CHAT = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
BAD_CHATS = {
    "unknown role": ([{"messages": [{"role": "bot", "content": "x"}]}], r"entry 0: message 0: role 'bot' is not"),
    "system not first": ([{"messages": [CHAT["messages"][0], {"role": "system", "content": "x"}]}],
                         r"entry 0: message 1: role 'system' is not system \(first only\)"),
    "no content": ([CHAT, {"messages": [{"role": "user"}]}], r"entry 1: message 0: 'content' is missing or not a string"),
    "content not text": ([{"messages": [{"role": "user", "content": 3}]}], r"entry 0: message 0: 'content' is missing"),
    "no assistant turn last": ([CHAT, {"messages": CHAT["messages"][:1]}], r"entry 1: its last message is not the assistant's"),
    "no messages": ([{"messages": []}], r"entry 0: 'messages' is not a list of messages"),
    "messages not a list": ([{"messages": "hi"}], r"entry 0: 'messages' is not a list of messages"),
    "mixed file": ([CHAT, {"instruction": "a", "output": "b"}], r"entry 1: not of the file's kind \(a file holds Alpaca entries or conversations\)"),
}


@pytest.mark.parametrize("case", BAD_CHATS)
def test_a_bad_conversation_is_one_error_naming_the_file_the_entry_and_what_is_wrong(tmp_path, case):
    entries, message = BAD_CHATS[case]
    for path in (write_jsonl(tmp_path / "c.jsonl", entries), tmp_path / "c.json"):
        path.write_text(json.dumps(entries)) if path.suffix == ".json" else None
        with pytest.raises(ValueError, match=message) as err:
            sft.load_entries(str(path))
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_json_lines_of_either_kind_read_as_the_json_list_and_a_broken_line_is_named(tmp_path, capsys):
    alpaca = json.loads(DATA.read_text())[:5]
    assert sft.load_entries(str(write_jsonl(tmp_path / "a.jsonl", alpaca))) == alpaca
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT] * 3)
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line is skipped
    assert sft.load_entries(str(path)) == [CHAT] * 3
    path.write_text(path.read_text() + '{"messages": [\n')
    code, _, err = run(capsys, "train", "--model", "tiny", "--data", path, "--out", tmp_path / "run")
    assert code.startswith(f"error: {path}: cannot read JSON (") and ": line 5 column " in code  # the file's line


def test_the_shipped_conversations_are_the_books_entries_after_two_turns_of_memory():
    chats = sft.load_entries(str(SHIPPED))
    book = json.loads(DATA.read_text())
    assert len(chats) == len(book) == 1100
    for chat, entry in zip(chats, book):
        *_, remember, recall, task = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        word = remember.split()[-1].rstrip(".")
        assert task == entry["output"] and recall == f"The word was {word}."


# ---------------- runs: training, answers, the judge, the chat
MEMORY = [{"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"Remember {w}."}, {"role": "assistant", "content": f"Kept {w}."},
                        {"role": "user", "content": "Which?"}, {"role": "assistant", "content": f"{w.title()}."}]}
          for w in ["red", "blue", "green", "gold", "pink"] * 4]  # 20: 17 train, 2 test, 1 validation


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A run folder on conversations without training: small random weights, run.json as train writes it."""
    tmp = tmp_path_factory.mktemp("chat")
    out = tmp / "run"
    torch.manual_seed(3)
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=96, n_embd=32, n_layer=1, n_head=4)), out)
    cfg = sft.TrainConfig(model="tiny", data=str(write_jsonl(tmp / "m.jsonl", MEMORY)), out=str(out), style="chat")
    (out / "run.json").write_text(json.dumps(sft.asdict(cfg)))
    return out


def test_train_on_conversations_keeps_the_chat_style_and_refuses_rows_cut_before_every_answer(tmp_path, capsys):
    model = tmp_path / "small"
    gpt.save_pretrained(gpt.GPT(gpt.GPTConfig(n_positions=96, n_embd=32, n_layer=1, n_head=4)), model)
    data = write_jsonl(tmp_path / "m.jsonl", MEMORY)
    code, _, err = run(capsys, "train", "--model", model, "--data", data, "--mask-prompt", "--epochs", 1,
                       "--batch-size", 4, "--out", tmp_path / "run", "--precision", "fp32")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["style"] == "chat"
    assert "17 train / 1 validation / 2 test entries" in err
    code, _, err = run(capsys, "train", "--model", model, "--data", data, "--mask-prompt", "--max-length", 12,
                       "--out", tmp_path / "cut")  # 12 tokens: the system and first user turns only
    assert code.startswith("error: 17 of 17 training rows keep no target after --max-length 12")


def test_chat_answers_are_the_one_prompt_paths_at_the_last_turn_after_its_marker(chat_run):
    model, _ = sft.load_run(str(chat_run), "cpu")
    entries = MEMORY[:5]
    alone = []
    for entry in entries:
        before = rendered(entry["messages"][:-1] + [{"role": "assistant", "content": ""}])
        assert before.endswith("Which?\n<|assistant|>:\n")  # the turns before the last, then its marker
        prompt = torch.tensor([ids_of(before)])
        new = gpt.generate(model, prompt, 6, 96, eos_id=EOT)[0, prompt.shape[1]:].tolist()
        alone.append(ENC.decode(new).strip())
    assert sft.answer(model, entries, ENC, "chat", max_new_tokens=6) == alone


def test_eval_on_conversations_keeps_each_entry_and_judges_its_last_turn_against_the_turns_before(chat_run, capsys):
    url, bodies = ollama(replies=["70"])
    code, _, err = run(capsys, "eval", "--out", chat_run, "--url", url)
    assert code == 0, err
    saved = json.loads((chat_run / "instruction-data-with-response.json").read_text())
    test = MEMORY[17:19]
    assert [{k: v for k, v in e.items() if k != "model_response"} for e in saved] == test
    for entry, body in zip(saved, bodies):
        messages = entry["messages"]
        prompt = judge.judge_prompt(rendered(messages[:-1]), messages[-1]["content"], entry["model_response"])
        assert body["messages"][0]["content"] == prompt


def chat(monkeypatch, capsys, out, lines, *flags):
    """python sft.py generate on a conversations run, lines on stdin; the prompts the model was given, and stderr."""
    prompts = []
    def generate_batch(model, batch, max_new_tokens, **kw):  # the model's answer: always "Sure."
        prompts.extend(batch)
        return [ENC.encode_ordinary(" Sure.")] * len(batch)
    monkeypatch.setattr(gpt, "generate_batch", generate_batch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code, stdout, err = run(capsys, "generate", "--out", out, *flags)
    assert code == 0, err
    assert stdout == "Sure.\n" * len(lines)
    return [ENC.decode(p) for p in prompts], err


def test_generate_on_a_conversations_run_keeps_the_history_and_the_system_message(chat_run, monkeypatch, capsys):
    prompts, err = chat(monkeypatch, capsys, chat_run, ["Remember red.", "Which?", "Again?"], "--system", "Be brief.",
                          "--max-new-tokens", 20)  # 76 of the context's 96 tokens left for the prompt
    turns = [{"role": "system", "content": "Be brief."}]
    for line, prompt in zip(["Remember red.", "Which?", "Again?"], prompts):
        turns.append({"role": "user", "content": line})
        assert prompt == rendered(turns + [{"role": "assistant", "content": ""}])  # the whole history, then the marker
        turns.append({"role": "assistant", "content": "Sure."})
    assert "outgrew" not in err


def test_a_long_chat_drops_its_oldest_whole_turns_keeps_the_system_message_and_says_so_once(chat_run, monkeypatch,
                                                                                              capsys):
    lines = [f"Line {i}." for i in range(8)]  # a turn is 20 tokens: one fits beside the newest line
    prompts, err = chat(monkeypatch, capsys, chat_run, lines, "--system", "Be brief.", "--max-new-tokens", 40)
    assert err.count("the conversation outgrew the context") == 1
    for line, prompt in zip(lines, prompts):
        assert prompt.startswith("<|system|>\nBe brief.\n<|user|>\n")  # a whole user turn follows the system
        assert prompt.endswith(f"<|user|>\n{line}\n<|assistant|>:\n") and len(ENC.encode_ordinary(prompt)) <= 96 - 40
    assert "Line 5." not in prompts[-1] and "Line 6." in prompts[-1]


def test_a_long_chat_keeps_the_last_whole_turns_that_fit_so_after_the_system_message_it_opens_with_a_user_turn(
        chat_run, monkeypatch, capsys):
    lines = ["Tell me about the weather in Paris today, please.", "And in Rome?",
             "What about the sea near Naples in summer, then?", "Thanks."] * 2  # long lines, short answers ("Sure.")
    seen = []  # the messages of each answer's prompt, as generate gives them
    real_answer = sft.answer
    def answer(model, entries, enc, *args, **kw):
        seen.extend(e["messages"] for e in entries)
        return real_answer(model, entries, enc, *args, **kw)
    monkeypatch.setattr(sft, "answer", answer)
    room = 96 - 24  # the context less --max-new-tokens
    prompts, err = chat(monkeypatch, capsys, chat_run, lines, "--system", "Be brief.", "--max-new-tokens", 24)
    assert len(seen) == len(prompts) == len(lines)
    system = [{"role": "system", "content": "Be brief."}]
    turns = []  # the conversation's whole turns so far: a user's line, then its answer
    kept = []
    for line, messages, prompt in zip(lines, seen, prompts):
        last = lambda k: [m for turn in turns[len(turns) - k:] for m in turn]  # the last k whole turns
        fits = [k for k in range(len(turns) + 1)
                if len(sft.chat_row(system + last(k) + [{"role": "user", "content": line}, sft.OPEN_TURN], ENC)) <= room]
        k = max(fits, default=0)  # as many of the latest whole turns as fit, at least none
        assert messages == system + last(k) + [{"role": "user", "content": line}, sft.OPEN_TURN]
        assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * k + ["user"]  # user first, alternating
        assert prompt == rendered(messages)
        kept.append(k)
        turns.append([{"role": "user", "content": line}, {"role": "assistant", "content": "Sure."}])
    assert err.count("the conversation outgrew the context") == 1
    assert any(0 < k < n for n, k in enumerate(kept))  # some turns went, and some stayed


def test_system_is_refused_on_an_alpaca_run_input_on_a_chat_run_and_chat_style_on_alpaca_data(tmp_path, capsys,
                                                                                               chat_run):
    from test_cli import fake_run
    out = fake_run(tmp_path, [("Hi.", "", "Hello.")] * 10)
    for run_folder, flag in ((out, "--system"), (chat_run, "--input")):
        code, _, _ = run(capsys, "generate", "Hi.", "--out", run_folder, flag, "x")
        assert code == f"error: {run_folder}: --system is for runs on conversations, --input for the others"
    code, _, _ = run(capsys, "train", "--model", "tiny", "--style", "chat", "--out", tmp_path / "r",
                     "--data", tmp_path / "d.json")
    assert code.startswith("error: ") and "--style chat is for conversations" in code
