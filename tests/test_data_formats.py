"""Records → tokens and labels for each format: the supervised tokens must decode to exactly the answers + EOS.

The tiny tokenizer is byte-level without merges, so every ASCII character is one token and the expected
supervised text can be written down exactly. Its pad token is its EOS token (as in SmolLM2).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from lightning_peft.data.formats import detect_format, render_records
from lightning_peft.data.readers import Records
from lightning_peft.data.tokenization import IGNORE_INDEX, tokenize_rendered
from lightning_peft.errors import ConfigError, DataError

EOS = "<|im_end|>"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def tokenize(
    rows, tokenizer, fmt="auto", columns=None, max_length=512, truncation=True, train_on_prompt=False, roles=None
):
    records = Records(Path("train.jsonl"), rows, "line", list(range(1, len(rows) + 1)))
    used, rendered = render_records(records, fmt, columns or {}, tokenizer, train_on_prompt, roles)
    return tokenize_rendered(rendered, tokenizer, max_length, truncation, used, records.where)


def supervised(tokenizer, data, i=0) -> str:
    ids, labels = data.example(i)
    assert np.array_equal(ids[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    return tokenizer.decode(ids[labels != IGNORE_INDEX].tolist())


def supervised_runs(tokenizer, data, i=0) -> list[str]:
    """The supervised tokens as contiguous runs, decoded."""
    ids, labels = data.example(i)
    on = labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
    return [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, changed to add its BOS token by itself (as Llama tokenizers do)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tokenizer.bos_token_id)]
    )
    return tokenizer


def test_messages_supervise_each_assistant_turn_and_its_end_token(tiny_tokenizer):
    data = tokenize([{"messages": CHAT}], tiny_tokenizer)
    assert data.format == "messages"
    ids, _ = data.example(0)
    assert tiny_tokenizer.decode(ids.tolist()) == tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    # The `<|im_start|>assistant\n` header and the newline after <|im_end|> are not learned; the reply and
    # <|im_end|> are, for every assistant turn.
    assert supervised_runs(tiny_tokenizer, data) == ["Hello!" + EOS, "4" + EOS]


def test_messages_train_on_prompt_supervises_everything(tiny_tokenizer):
    data = tokenize([{"messages": CHAT}], tiny_tokenizer, train_on_prompt=True)
    ids, labels = data.example(0)
    assert labels[0] == IGNORE_INDEX  # nothing precedes the first token: never a label
    assert np.array_equal(labels[1:], ids[1:])


def test_pad_equal_to_eos_still_learns_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    data = tokenize([{"text": "abc"}], tiny_tokenizer)
    ids, labels = data.example(0)
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert labels[-1] == tiny_tokenizer.eos_token_id


def test_prompt_completion_strings(tiny_tokenizer):
    data = tokenize([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], tiny_tokenizer)
    assert data.format == "prompt_completion"
    ids, _ = data.example(0)
    assert tiny_tokenizer.decode(ids.tolist()) == "Q: 2+2?\nA: 4" + EOS
    assert supervised(tiny_tokenizer, data) == " 4" + EOS


def test_prompt_completion_conversational_learns_only_the_completion(tiny_tokenizer):
    row = {"prompt": CHAT[:4], "completion": [{"role": "assistant", "content": "Four."}]}
    data = tokenize([row], tiny_tokenizer)
    # The few-shot assistant turn inside the prompt is not learned, only the completion's.
    assert supervised_runs(tiny_tokenizer, data) == ["Four." + EOS]
    ids, _ = data.example(0)
    full = tiny_tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    assert tiny_tokenizer.decode(ids.tolist()) == full


def test_alpaca_with_and_without_input(tiny_tokenizer):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye!"},
    ]
    data = tokenize(rows, tiny_tokenizer)
    assert data.format == "alpaca"
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 2\n\n### Response:\n4" + EOS
    )
    no_input = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!" + EOS
    )
    assert tiny_tokenizer.decode(data.example(0)[0].tolist()) == with_input
    assert tiny_tokenizer.decode(data.example(1)[0].tolist()) == no_input
    assert [supervised(tiny_tokenizer, data, i) for i in range(3)] == ["4" + EOS, "Hi!" + EOS, "Bye!" + EOS]


def test_text_supervises_every_token_after_the_first(tiny_tokenizer):
    data = tokenize([{"text": "hello world"}], tiny_tokenizer)
    assert data.format == "text"
    assert supervised(tiny_tokenizer, data) == "ello world" + EOS


def test_tokenizer_that_adds_bos_keeps_it_for_plain_text_but_not_for_chat(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    text = tokenize([{"text": "hello"}], bos_tokenizer)
    ids, _ = text.example(0)
    assert ids[0] == bos and ids[1] != bos
    assert supervised(bos_tokenizer, text) == "hello" + EOS
    chat = tokenize([{"messages": CHAT}], bos_tokenizer)
    ids, _ = chat.example(0)
    # The ChatML template starts with <|im_start|> (the BOS here): no second one may be added.
    assert ids[0] == bos and ids[1] != bos


def test_tokenizer_that_appends_eos_itself_gets_no_second_one(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tokenizer.eos_token_id)]
    )
    data = tokenize([{"prompt": "a", "completion": "b"}], tokenizer)
    assert tokenizer.decode(data.example(0)[0].tolist()) == "ab" + EOS
    assert supervised(tokenizer, data) == "b" + EOS


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages", "text"], "messages"),
        (["prompt", "completion", "text"], "prompt_completion"),
        (["instruction", "input", "output", "text"], "alpaca"),
        (["text", "id"], "text"),
    ],
)
def test_detect_format_by_priority(columns, expected):
    assert detect_format(columns, {}) == expected


def test_detect_format_failure_lists_columns_and_needs():
    with pytest.raises(DataError, match=r"columns \(question, answer\).*prompt_completion: `prompt`, `completion`"):
        detect_format(["question", "answer"], {})


def test_column_mapping(tiny_tokenizer):
    rows = [{"question": "2+2=", "answer": "4", "text": "ignored"}]
    data = tokenize(rows, tiny_tokenizer, columns={"prompt": "question", "completion": "answer"})
    assert data.format == "prompt_completion"
    assert tiny_tokenizer.decode(data.example(0)[0].tolist()) == "2+2=4" + EOS
    assert supervised(tiny_tokenizer, data) == "4" + EOS


def test_sharegpt_conversations_through_the_column_mapping(tiny_tokenizer):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    data = tokenize([{"conversations": turns}], tiny_tokenizer, columns={"messages": "conversations"})
    assert data.format == "messages"
    assert supervised_runs(tiny_tokenizer, data) == ["Hello!" + EOS]


def test_unknown_role_names_the_role_the_row_and_the_accepted_roles(tiny_tokenizer):
    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "Hm"}]}]
    with pytest.raises(DataError) as info:
        tokenize(rows, tiny_tokenizer)
    assert str(info.value) == (
        "train.jsonl line 2: field `messages` item 1: role 'wizard' is not one of system, user, assistant, tool "
        "(ShareGPT's human and gpt included); map it onto one with data.roles, e.g. {wizard: assistant}."
    )
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello!"}]}]
    with pytest.raises(DataError, match=r"line 1: field `messages` \(column `conversations`\) item 1: role 'bot'"):
        tokenize(sharegpt, tiny_tokenizer, columns={"messages": "conversations"})


def test_roles_map_the_data_roles_onto_the_standard_ones(tiny_tokenizer):
    turns = [{"role": "narrator", "content": "Be brief."}, {"role": "human", "content": "Hi"}]
    turns += [{"role": "wizard", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    turns += [{"role": "wizard", "content": "4"}]
    roles = {"narrator": "system", "wizard": "assistant"}
    data = tokenize([{"messages": turns}], tiny_tokenizer, roles=roles)
    # The same tokens and labels as the conversation written with the standard roles.
    reference = tokenize([{"messages": CHAT}], tiny_tokenizer)
    assert np.array_equal(data.input_ids, reference.input_ids) and np.array_equal(data.labels, reference.labels)
    assert supervised_runs(tiny_tokenizer, data) == ["Hello!" + EOS, "4" + EOS]
    # ShareGPT's `from` goes through the same mapping, and a mapping may override ShareGPT's own names.
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello!"}]
    data = tokenize(
        [{"conversations": sharegpt}], tiny_tokenizer, columns={"messages": "conversations"}, roles={"bot": "assistant"}
    )
    assert supervised_runs(tiny_tokenizer, data) == ["Hello!" + EOS]
    data = tokenize([{"messages": CHAT}], tiny_tokenizer, roles={"user": "assistant", "assistant": "user"})
    assert supervised_runs(tiny_tokenizer, data) == ["Hi" + EOS, "2+2?" + EOS]


def test_mapped_column_missing_names_field_and_column(tiny_tokenizer):
    rows = [{"question": "q", "answer": "a"}]
    with pytest.raises(DataError, match=r"train\.jsonl: cannot detect.*`prompt` \(column `query`\)"):
        tokenize(rows, tiny_tokenizer, columns={"prompt": "query", "completion": "answer"})
    with pytest.raises(DataError, match=r"line 1: field `prompt` \(column `query`\) is missing \(columns: question"):
        tokenize(rows, tiny_tokenizer, fmt="prompt_completion", columns={"prompt": "query"})


def test_missing_field_names_the_row(tiny_tokenizer):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c"}]
    with pytest.raises(DataError, match=r"train\.jsonl line 2: field `completion` is missing \(columns: prompt\)"):
        tokenize(rows, tiny_tokenizer)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": "hi"}, r"line 1: field `messages` must be a list of \{role, content\} objects, got str"),
        ({"messages": []}, r"must be a list of \{role, content\} objects, got an empty list"),
        ({"messages": [{"text": "hi"}]}, r"item 0 is an object with keys text"),
        ({"messages": [{"role": "user", "content": 3}]}, r"item 0: `content` must be a string, got int"),
        ({"prompt": 1, "completion": "b"}, r"field `prompt` must be a string, got int"),
        ({"instruction": "a", "output": None}, r"field `output` must be a string, got null"),
        ({"text": ["a"]}, r"field `text` must be a string, got list"),
    ],
)
def test_mistyped_fields(tiny_tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        tokenize([row], tiny_tokenizer)


def test_no_chat_template_suggests_another_format(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match=r"has none; .*data.format 'text', 'prompt_completion'"):
        tokenize([{"messages": CHAT}], tokenizer)
    # Plain formats do not need the template.
    assert len(tokenize([{"prompt": "a", "completion": "b"}], tokenizer)) == 1


def test_template_that_is_not_prefix_stable(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # Rewrites the last turn: rendering a prefix of the conversation no longer gives a prefix of the text.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}|{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(DataError, match=r"line 1: the chat template is not prefix-stable"):
        tokenize([{"messages": CHAT}], tokenizer)


def test_template_error_names_the_row(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    rows = [{"messages": CHAT}, {"messages": [*CHAT, {"role": "tool", "content": "x"}]}]
    with pytest.raises(DataError, match=r"line 2: the chat template failed on this conversation.*no tools"):
        tokenize(rows, tokenizer)


def test_conversation_without_assistant_turn_is_dropped(tiny_tokenizer):
    data = tokenize([{"messages": CHAT}, {"messages": CHAT[:2]}], tiny_tokenizer)
    assert len(data) == 1
    assert data.dropped.tolist() == [1]
    assert data.stats()["dropped"] == 1


def test_truncation_counts_and_drops(tiny_tokenizer):
    rows = [
        {"prompt": "ab", "completion": "cd"},  # 5 tokens with EOS
        {"prompt": "ab", "completion": "cdefghijkl"},  # 13: truncated, keeps supervised tokens
        {"prompt": "abcdefghijkl", "completion": "m"},  # the prompt fills max_length: dropped
    ]
    data = tokenize(rows, tiny_tokenizer, max_length=8)
    assert data.lengths.tolist() == [5, 8]
    assert data.truncated.tolist() == [False, True]
    assert data.dropped.tolist() == [2]
    assert supervised(tiny_tokenizer, data, 1) == "cdefgh"
    assert data.stats() == {
        "examples_read": 3,
        "examples": 2,
        "dropped": 1,
        "truncated": 1,
        "tokens": 13,
        "supervised_tokens": 3 + 6,
    }


def test_truncation_off_names_row_length_and_fix(tiny_tokenizer):
    rows = [{"text": "abc"}, {"text": "abcdefghijkl"}]
    with pytest.raises(
        DataError,
        match=r"train\.jsonl line 2: the example is 13 tokens long, more than max_length=8; raise data\.max_length "
        r"or set data\.truncation: true",
    ):
        tokenize(rows, tiny_tokenizer, max_length=8, truncation=False)


@pytest.mark.slow
def test_smollm2_template_masks(smollm2_dir):
    """The real SmolLM2 tokenizer (BPE merges, pad == eos == <|im_end|>, a default system prompt)."""
    from lightning_peft.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    chat = tokenize([{"messages": CHAT[1:]}], tokenizer)
    ids, _ = chat.example(0)
    assert tokenizer.decode(ids.tolist()).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert supervised_runs(tokenizer, chat) == ["Hello!" + EOS, "4" + EOS]
    plain = tokenize([{"prompt": "Q: capital of France?\nA:", "completion": " Paris."}], tokenizer)
    assert supervised(tokenizer, plain) == " Paris." + EOS
