"""Chat templates: the built-in ones, and giving a tokenizer the template (and tokens) a run asks for.

`data.chat_template` is a built-in name, a Jinja string or a `.jinja` file. `apply_chat_template` installs it on
the tokenizer and adds the special tokens it writes that the vocabulary lacks (`<|im_start|>` for ChatML on a
base Llama); the model then gives those tokens new embedding rows, trained through PEFT's trainable tokens
(`lightning_peft.adapters.train_new_tokens`). Adding tokens in one fixed order makes the data module and the
model, which each prepare their own tokenizer, agree on the new ids.

The built-ins follow the templates the models ship (text only: no tools, images or date strings), and each is
prefix-stable: rendering the first turns of a conversation gives the start of the whole rendering, which is how
`formats.ChatRenderer` finds the assistant turns that carry the loss.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError

SETTING = "data.chat_template"


@dataclass(frozen=True)
class ChatTemplate:
    """A built-in template and the special tokens it writes (besides the tokenizer's own BOS/EOS).

    Attributes:
        source: the Jinja source.
        tokens: literal special tokens of the template, added to a vocabulary that lacks them.
    """

    source: str
    tokens: tuple[str, ...]


# ChatML (OpenAI; SmolLM2, Hermes ...), as the byte tokenizer in `lightning_peft.testing` has it.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2-Instruct: ChatML with a default system turn when the conversation has none.
QWEN2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct.
LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct v0.1/v0.2: [INST] is plain text in their vocabulary; no system turn, roles alternate.
MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

# Gemma 3 (text): a system turn is written at the start of the first user turn; the assistant is "model".
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Phi-3 / Phi-3.5-mini-instruct (the end-of-text token closes a conversation that needs no reply).
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

BUILTIN: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(CHATML, ("<|im_start|>", "<|im_end|>")),
    "gemma": ChatTemplate(GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "llama3": ChatTemplate(LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": ChatTemplate(MISTRAL, ()),
    "phi3": ChatTemplate(PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "qwen2": ChatTemplate(QWEN2, ("<|im_start|>", "<|im_end|>")),
}
# In a custom template, string literals shaped like `<|name|>` are taken as its special tokens.
_CUSTOM_TOKEN = re.compile(r"<\|[A-Za-z0-9_.-]+\|>")


def builtin_names() -> str:
    """The built-in names, comma separated (for messages)."""
    return ", ".join(BUILTIN)


def resolve(value: str) -> ChatTemplate:
    """The template `value` names: a built-in name, a Jinja string (holds `{{` or `{%`) or a `.jinja` file.

    Raises:
        ConfigError: an unknown name, or a file that is missing or unreadable.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"`{SETTING}`={value!r} must be a built-in name ({builtin_names()}), a Jinja string or a .jinja file."
        )
    if value in BUILTIN:
        return BUILTIN[value]
    if "{{" in value or "{%" in value:
        return _custom(value)
    path = Path(value).expanduser()
    if path.suffix == ".jinja" or path.is_file():
        return _custom(_read(path, value))
    raise ConfigError(
        f"`{SETTING}`={value!r} is not a built-in template ({builtin_names()}), a Jinja string or an existing "
        ".jinja file; use one of those names, or the path of your template file."
    )


def _read(path: Path, value: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"`{SETTING}`={value!r}: the file does not exist; give the path of a .jinja template or a built-in "
            f"name ({builtin_names()})."
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"`{SETTING}`={value!r}: the file cannot be read ({err}); give a UTF-8 .jinja file."
        ) from None


def _custom(source: str) -> ChatTemplate:
    return ChatTemplate(source, tuple(dict.fromkeys(_CUSTOM_TOKEN.findall(source))))


def apply_chat_template(tokenizer: Any, value: str | None) -> list[str]:
    """Give `tokenizer` the template `value` (None keeps its own) and the special tokens it lacks.

    Tokens are added in the template's order, so two tokenizers prepared alike get the same new ids.

    Returns:
        The tokens added to the vocabulary (empty when it had them all).
    """
    if value is None:
        return []
    template = resolve(value)
    vocab = tokenizer.get_vocab()
    missing = [token for token in template.tokens if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = template.source
    return missing


def special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens (its named ones and special added ones), longest first."""
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    specials.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return tuple(sorted((s for s in specials if s), key=len, reverse=True))


def stop_token_ids(
    tokenizer: Any, templates: Iterable[str | None] = (None,), generation_config: Any = None
) -> list[int]:
    """The ids a chat reply stops at: the model's EOS ids (its generation config's, else the tokenizer's) and the
    token that closes an assistant turn in each template (None: the tokenizer's own), e.g. `<|im_end|>` for chatml
    on a base Llama whose EOS is `</s>`."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = {tokenizer.eos_token_id, *configured, *(_end_of_turn(tokenizer, template) for template in templates)}
    return sorted(i for i in ids if i is not None)


def _end_of_turn(tokenizer: Any, template: str | None) -> int | None:
    # Found by rendering a probe conversation: the special token right after the reply, as `ChatRenderer` ends
    # the supervised span of a turn on it.
    reply = "lpeft-probe-reply"
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception:  # no template, or one that refuses the probe: EOS alone
        return None
    rest = text[text.find(reply) + len(reply) :].lstrip() if reply in text else ""
    token = next((t for t in special_tokens(tokenizer) if rest.startswith(t)), None)
    return None if token is None else int(tokenizer.convert_tokens_to_ids(token))


def added_token_ids(tokenizer: Any, tokens: list[str]) -> list[int]:
    """The ids of `tokens` in `tokenizer`."""
    return [int(tokenizer.convert_tokens_to_ids(token)) for token in tokens]
