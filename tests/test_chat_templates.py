"""`data.chat_template`: built-in, Jinja-string and file templates on a tokenizer without one.

The base tokenizer is byte-level without merges and without ChatML tokens (`byte_tokenizer(chat=False)`), so
every character of a reply is one token and the supervised text can be written down exactly: each assistant
turn's content followed by its template's end-of-turn token, and nothing else.
"""

from __future__ import annotations

import json

import pytest
from test_data_formats import CHAT, supervised_runs, tokenize

from lightning_peft.data import SFTDataModule, chat_templates
from lightning_peft.data.cache import cache_key
from lightning_peft.data.chat_templates import BUILTIN, apply_chat_template, stop_token_ids
from lightning_peft.errors import ConfigError
from lightning_peft.testing import byte_tokenizer

# Gemma writes the system turn into the first user turn; Mistral (v0.1/v0.2) has no system turn at all.
NO_SYSTEM = {"mistral"}
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "qwen2": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "gemma": "<end_of_turn>",
    "phi3": "<|end|>",
}
CUSTOM = (
    "{% for m in messages %}{{ '<|turn|>' + m['role'] + ': ' + m['content'] + '<|stop|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn|>assistant: ' }}{% endif %}"
)


def base_tokenizer():
    """A fresh base-model tokenizer (each test changes its own: templates add tokens)."""
    return byte_tokenizer(chat=False)


def test_every_required_builtin_is_there():
    assert {"chatml", "llama3", "mistral", "gemma", "phi3", "qwen2"} <= set(BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_supervises_exactly_the_replies_and_their_end_token(name):
    tokenizer = base_tokenizer()
    added = apply_chat_template(tokenizer, name)
    assert added == [t for t in BUILTIN[name].tokens]  # the base vocabulary has none of them
    chat = CHAT[1:] if name in NO_SYSTEM else CHAT
    data = tokenize([{"messages": chat}], tokenizer)
    end = END_OF_TURN[name]
    assert supervised_runs(tokenizer, data) == [f"Hello!{end}", f"4{end}"]
    # The labels' tokens are the text's own, and every added token the text holds is one token of its own.
    ids = data.example(0)[0].tolist()
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.convert_tokens_to_ids(token) in ids for token in added if token in text)


@pytest.mark.parametrize("source", ["string", "file"])
def test_custom_template_string_or_file(tmp_path, source):
    tokenizer = base_tokenizer()
    value = CUSTOM
    if source == "file":
        (tmp_path / "my.jinja").write_text(CUSTOM, encoding="utf-8")
        value = str(tmp_path / "my.jinja")
    assert apply_chat_template(tokenizer, value) == ["<|turn|>", "<|stop|>"]
    assert tokenizer.chat_template == CUSTOM
    data = tokenize([{"messages": CHAT}], tokenizer)
    assert supervised_runs(tokenizer, data) == ["Hello!<|stop|>", "4<|stop|>"]


def test_same_template_gives_the_same_ids_and_is_idempotent():
    first, second = base_tokenizer(), base_tokenizer()
    apply_chat_template(first, "llama3")
    apply_chat_template(second, "llama3")
    assert apply_chat_template(second, "llama3") == []
    assert first.get_vocab() == second.get_vocab()
    assert len(first) == len(base_tokenizer()) + 3


def test_no_template_and_no_setting_names_the_setting():
    with pytest.raises(ConfigError, match=r"has none; set `data.chat_template` to a built-in \(chatml, .*qwen2\)"):
        tokenize([{"messages": CHAT}], base_tokenizer())


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("chatlm", r"`data.chat_template`='chatlm' is not a built-in template \(chatml, gemma, llama3, mistral"),
        ("missing.jinja", r"`data.chat_template`='missing.jinja': the file does not exist; give the path"),
        ("", r"`data.chat_template`='' must be a built-in name"),
    ],
)
def test_bad_setting(value, match):
    with pytest.raises(ConfigError, match=match):
        chat_templates.resolve(value)
    # The data module refuses it when it is built, before any training.
    with pytest.raises(ConfigError, match=match):
        SFTDataModule("train.jsonl", chat_template=value)


def write_chat(tmp_path, n=6):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * i}]}
        for i in range(1, n + 1)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_data_module_applies_the_setting(tmp_path):
    tokenizer = base_tokenizer()
    dm = SFTDataModule(write_chat(tmp_path), tokenizer=tokenizer, chat_template="chatml", batch_size=2)
    dm.setup("fit")
    assert dm.tokenizer.chat_template == BUILTIN["chatml"].source
    assert dm.tokenizer.convert_tokens_to_ids("<|im_end|>") == len(base_tokenizer()) + 1
    batch = next(iter(dm.train_dataloader()))
    assert dm.tokenizer.convert_tokens_to_ids("<|im_start|>") in batch["input_ids"].tolist()[0]
    assert dm.hparams.chat_template == "chatml"


def test_cache_key_follows_the_template(tmp_path):
    path = write_chat(tmp_path)
    keys = set()
    for value in ("chatml", "qwen2", CUSTOM):
        tokenizer = base_tokenizer()
        apply_chat_template(tokenizer, value)
        keys.add(cache_key(path, {}, tokenizer))
    assert len(keys) == 3


def test_help_documents_the_setting():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SFTDataModule, "data")
    assert "--data.chat_template" in parser.format_help()
    assert "a built-in name (chatml, gemma, llama3, mistral, phi3, qwen2)" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_stop_tokens_are_eos_and_the_end_of_turn(name):
    from transformers import GenerationConfig

    tokenizer = base_tokenizer()
    apply_chat_template(tokenizer, name)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN[name])
    assert stop_token_ids(tokenizer) == sorted({tokenizer.eos_token_id, end})
    # The model's own EOS ids (Llama 3's generation config lists several) are kept.
    config = GenerationConfig(eos_token_id=[0, tokenizer.eos_token_id])
    assert stop_token_ids(tokenizer, generation_config=config) == sorted({0, tokenizer.eos_token_id, end})


def test_stop_tokens_without_a_template_are_eos():
    assert stop_token_ids(base_tokenizer()) == [2]
