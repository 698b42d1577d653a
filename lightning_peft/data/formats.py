"""Records → text with the character spans that carry the loss, for the four data formats TRL users have.

Each record becomes one `Rendered`: the full training text plus the character spans whose tokens are supervised.
Working in characters and tokenizing the full text once (see `tokenization.py`) keeps the tokens identical to what
the model sees at inference; tokenizing pieces separately would change tokens at the seams.

For generation (`render_prompts`) each record becomes a `Prompt`: the text before the answer, built by the same
helpers as the training text, so a prompt is exactly the start of the training text of the same record (the chat
template's generation prompt included).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_peft.data import chat_templates
from lightning_peft.data.readers import Records
from lightning_peft.errors import ConfigError, DataError
from lightning_peft.options import FORMATS

log = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = ("messages", "prompt", "completion", "instruction", "input", "output", "text")
# In detection order: the first format whose fields are all present wins.
REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
# For generation the answer fields are optional: a format is recognized from its prompt fields alone.
PROMPT_REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt",),
    "alpaca": ("instruction",),
    "text": ("text",),
}

# The Stanford Alpaca prompts (github.com/tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The roles chat templates know; a message with another role is an error unless `roles` maps it onto one of these.
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
# ShareGPT files say {"from": "human", "value": ...}; the chat templates want {"role": "user", "content": ...}.
# These role names are understood in every conversation (`roles` adds others or overrides them).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Rendered:
    """One example as text, before tokenization.

    Attributes:
        text: the full training text.
        spans: [start, end) character spans whose tokens are supervised.
        special_tokens: let the tokenizer add its own BOS/EOS (plain text); False for chat templates, which
            already write their special tokens.
        append_eos: append the EOS token (and learn it) unless the tokenizer already ended with it.
        supervise_all: every token is supervised (plain LM, or `train_on_prompt`).
    """

    text: str
    spans: tuple[tuple[int, int], ...] = ()
    special_tokens: bool = True
    append_eos: bool = True
    supervise_all: bool = False


@dataclass(frozen=True)
class Prompt:
    """One record's prompt for generation, before tokenization.

    Attributes:
        text: what the model is given; the generated tokens continue it.
        special_tokens: let the tokenizer add its own BOS (plain text); False for chat templates.
        reference: the record's answer when the file holds one (messages: the final assistant turn), else None.
    """

    text: str
    special_tokens: bool = True
    reference: str | None = None


class RowError(Exception):
    """A problem with one row; `render_records` prefixes it with the file and row."""


def detect_format(
    columns: list[str], mapping: Mapping[str, str], required: Mapping[str, tuple[str, ...]] = REQUIRED
) -> str:
    """The first format (messages > prompt/completion > alpaca > text) whose fields the columns hold.

    Args:
        columns: the file's columns.
        mapping: our field name -> the file's column.
        required: the fields each format needs: `REQUIRED` for training, `PROMPT_REQUIRED` for generation.

    Raises:
        DataError: no format matches; the message lists the columns found and what each format needs.
    """
    present = set(columns)
    for name, fields in required.items():
        if all(mapping.get(f, f) in present for f in fields):
            return name
    needs = "; ".join(f"{name}: {', '.join(_column(f, mapping) for f in fields)}" for name, fields in required.items())
    raise DataError(
        f"cannot detect the data format from the columns ({', '.join(columns) or 'none'}); the formats need "
        f"{needs}. Rename the columns, map them with data.columns, or set data.format."
    )


def render_records(
    records: Records,
    fmt: str,
    mapping: Mapping[str, str],
    tokenizer: Any,
    train_on_prompt: bool = False,
    roles: Mapping[str, str] | None = None,
) -> tuple[str, list[Rendered]]:
    """Render every record; `fmt` "auto" is resolved from the columns. Returns (format, rendered examples).

    `roles` maps the data's role names onto `ROLES` (ShareGPT's human and gpt are mapped without it); a message
    whose role is none of `ROLES` after that is an error naming the row.

    Raises:
        DataError: a record lacks a field or has one of the wrong type, or the chat template fails on it.
        ConfigError: a chat format with a tokenizer that has no chat template.
    """
    fmt = _resolve_format(records, fmt, mapping, REQUIRED)
    return fmt, _render_each(records, mapping, roles, _renderer(fmt, tokenizer, train_on_prompt))


def training_format(records: Records, fmt: str, mapping: Mapping[str, str]) -> str:
    """`fmt`, or for "auto" the training format the columns of the first record call for (see `render_records`)."""
    return _resolve_format(records, fmt, mapping, REQUIRED)


def render_prompts(
    records: Records, fmt: str, mapping: Mapping[str, str], tokenizer: Any, roles: Mapping[str, str] | None = None
) -> tuple[str, list[Prompt]]:
    """Render every record's prompt for generation; `fmt` "auto" is resolved from the prompt columns alone.

    messages: the conversation without its final assistant turn (that turn is the reference), or the whole
    conversation when it does not end with one, rendered with the chat template and its generation prompt.
    prompt_completion: the prompt (a conversational prompt as messages). alpaca: the Alpaca prompt up to
    "### Response:\n". text: the text itself. The answer fields are optional and become `Prompt.reference`.

    Raises:
        DataError: a record lacks a prompt field or has one of the wrong type, or the chat template fails on it.
        ConfigError: a chat format with a tokenizer that has no chat template.
    """
    fmt = _resolve_format(records, fmt, mapping, PROMPT_REQUIRED)
    return fmt, _render_each(records, mapping, roles, _prompter(fmt, tokenizer))


def _resolve_format(records: Records, fmt: str, mapping: Mapping[str, str], required: Mapping) -> str:
    if fmt != "auto":
        return fmt
    try:
        return detect_format(records.columns, mapping, required)
    except DataError as err:
        raise DataError(f"{records.path.name}: {err}") from None


def _render_each(records: Records, mapping: Mapping[str, str], roles: Mapping[str, str] | None, render) -> list:
    out, role_names = [], {**SHAREGPT_ROLES, **(roles or {})}
    for i, row in enumerate(records.rows):
        try:
            out.append(render(_Row(row, mapping, role_names)))
        except RowError as err:
            raise DataError(f"{records.where(i)}: {err}") from None
    return out


def _renderer(fmt: str, tokenizer: Any, train_on_prompt: bool):
    if fmt == "text":
        return lambda row: Rendered(row.string("text"), supervise_all=True)
    if fmt == "alpaca":
        return lambda row: _alpaca(row, train_on_prompt)
    if fmt == "messages":
        chat = ChatRenderer(tokenizer, fmt)
        return lambda row: chat.render(row.messages("messages"), 0, train_on_prompt)
    if fmt == "prompt_completion":
        holder: dict[str, ChatRenderer] = {}  # built on first conversational row: plain rows need no template
        return lambda row: _prompt_completion(row, tokenizer, holder, train_on_prompt)
    raise ConfigError(f"`format`={fmt!r} is not one of auto, {', '.join(FORMATS)}.")


def _prompter(fmt: str, tokenizer: Any):
    if fmt == "text":
        return lambda row: Prompt(row.string("text"))
    if fmt == "alpaca":
        return lambda row: Prompt(_alpaca_prompt(row), reference=row.string("output", optional=True) or None)
    if fmt == "messages":
        chat = ChatRenderer(tokenizer, fmt)
        return lambda row: _messages_prompt(chat, row.messages("messages"))
    if fmt == "prompt_completion":
        holder: dict[str, ChatRenderer] = {}
        return lambda row: _prompt_completion_prompt(row, tokenizer, holder)
    raise ConfigError(f"`format`={fmt!r} is not one of auto, {', '.join(FORMATS)}.")


def _alpaca_prompt(row: _Row) -> str:
    instruction, extra = row.string("instruction"), row.string("input", optional=True)
    return (ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=extra)


def _alpaca(row: _Row, train_on_prompt: bool) -> Rendered:
    return _completion(_alpaca_prompt(row), row.string("output"), train_on_prompt)


def _messages_prompt(chat: ChatRenderer, messages: list[dict[str, Any]]) -> Prompt:
    # A conversation that ends with an assistant turn is a worked example: generate that turn again and keep it
    # as the reference. One that ends with any other turn is waiting for its reply: generate it.
    if messages[-1]["role"] == "assistant":
        return Prompt(chat.prompt(messages[:-1]), special_tokens=False, reference=messages[-1]["content"])
    return Prompt(chat.prompt(messages), special_tokens=False)


def _prompt_completion_prompt(row: _Row, tokenizer: Any, holder: dict) -> Prompt:
    completion = row.value("completion", optional=True)
    if isinstance(completion, list):
        reference: str | None = "\n".join(m["content"] for m in row.messages("completion"))
    else:
        reference = row.string("completion", optional=True) if completion is not None else None
    if isinstance(row.value("prompt"), list):
        if "chat" not in holder:
            holder["chat"] = ChatRenderer(tokenizer, "prompt_completion")
        return Prompt(holder["chat"].prompt(row.messages("prompt")), special_tokens=False, reference=reference)
    return Prompt(row.string("prompt"), reference=reference)


def _prompt_completion(row: _Row, tokenizer: Any, holder: dict, train_on_prompt: bool) -> Rendered:
    prompt, completion = row.value("prompt"), row.value("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        # TRL's conversational variant: both are lists of messages, the completion's turns carry the loss.
        if "chat" not in holder:
            holder["chat"] = ChatRenderer(tokenizer, "prompt_completion")
        first, rest = row.messages("prompt"), row.messages("completion")
        return holder["chat"].render(first + rest, len(first), train_on_prompt)
    return _completion(row.string("prompt"), row.string("completion"), train_on_prompt)


def _completion(prompt: str, completion: str, train_on_prompt: bool) -> Rendered:
    # Concatenated as is (TRL): the data decides on the separating space or newline.
    text = prompt + completion
    return Rendered(text, ((len(prompt), len(text)),), supervise_all=train_on_prompt)


class _Row:
    """One record seen through the column and role mappings, with typed accessors that raise `RowError`."""

    def __init__(self, row: dict[str, Any], mapping: Mapping[str, str], roles: Mapping[str, str] = SHAREGPT_ROLES):
        self.row, self.mapping, self.roles = row, mapping, roles

    def _name(self, field: str) -> str:
        return _column(field, self.mapping)

    def value(self, field: str, optional: bool = False) -> Any:
        column = self.mapping.get(field, field)
        if column not in self.row or (optional and self.row[column] is None):
            if optional:
                return None
            raise RowError(
                f"field {self._name(field)} is missing (columns: {', '.join(map(str, self.row)) or 'none'}); "
                "add it, map another column with data.columns, or set data.format."
            )
        return self.row[column]

    def string(self, field: str, optional: bool = False) -> str:
        value = self.value(field, optional)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            raise RowError(f"field {self._name(field)} must be a string, got {_type(value)}.")
        return value

    def messages(self, field: str) -> list[dict[str, Any]]:
        value = self.value(field)
        shape = "a list of {role, content} objects"
        if not isinstance(value, list) or not value:
            got = "an empty list" if isinstance(value, list) else _type(value)
            raise RowError(f"field {self._name(field)} must be {shape}, got {got}.")
        out = []
        for j, message in enumerate(value):
            if isinstance(message, dict) and "role" not in message and {"from", "value"} <= message.keys():
                message = {"role": message["from"], "content": message["value"]}
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise RowError(f"field {self._name(field)} must be {shape}; item {j} is {_describe(message)}.")
            if not isinstance(message.get("content"), str):
                raise RowError(
                    f"field {self._name(field)} item {j}: `content` must be a string, "
                    f"got {_type(message.get('content'))}."
                )
            out.append({**message, "role": self._role(field, j, message["role"])})
        return out

    def _role(self, field: str, j: int, role: str) -> str:
        standard = self.roles.get(role, role)
        if standard not in ROLES:
            raise RowError(
                f"field {self._name(field)} item {j}: role {role!r} is not one of {', '.join(ROLES)} (ShareGPT's "
                f"human and gpt included); map it onto one with data.roles, e.g. {{{role}: assistant}}."
            )
        return standard


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template and finds the assistant turns' characters.

    The span of assistant turn i is what `messages[:i+1]` adds to `messages[:i]` rendered with the generation
    prompt: the reply and the template's end-of-turn token, without the `<|im_start|>assistant` header. That holds
    only if each rendering is a prefix of the next, which is checked (some templates rewrite earlier turns).
    """

    def __init__(self, tokenizer: Any, fmt: str):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"`format`={fmt!r} renders conversations with a chat template, but the tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has none; set "
                f"`{chat_templates.SETTING}` to a built-in ({chat_templates.builtin_names()}), a Jinja string or a "
                ".jinja file, or use data.format 'text', 'prompt_completion' (strings) or 'alpaca'."
            )
        self.tokenizer = tokenizer
        self.end_tokens = chat_templates.special_tokens(tokenizer)

    def render(self, messages: list[dict[str, Any]], first: int, supervise_all: bool) -> Rendered:
        """Render `messages`; assistant turns from index `first` on are supervised (all text if `supervise_all`)."""
        text = self._apply(messages, False)
        spans = []
        for i in range(first, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            prefix, upto = self.prompt(messages[:i]), self._apply(messages[: i + 1], False)
            end = self._turn_end(upto, len(prefix), messages[i]["content"])
            if not (upto.startswith(prefix) and text.startswith(upto[:end])):
                raise RowError(
                    "the chat template is not prefix-stable (rendering the first turns of the conversation does "
                    "not give the start of the whole rendering), so the assistant tokens cannot be located; "
                    "use a template without that behaviour, or data.format 'prompt_completion' with strings."
                )
            spans.append((len(prefix), end))
        return Rendered(text, tuple(spans), special_tokens=False, append_eos=False, supervise_all=supervise_all)

    def prompt(self, messages: list[dict[str, Any]]) -> str:
        """`messages` rendered with the generation prompt: what the model continues with the next assistant turn.

        The training spans start exactly where this text ends, so generation sees the training layout.
        """
        return self._apply(messages, True)

    def _turn_end(self, upto: str, start: int, content: str) -> int:
        # The turn ends on the first end-of-turn token after the reply: whitespace after it is not something to
        # predict, nor is what some templates write only after a conversation's last turn (Phi-3's EOS).
        # Templates without such a token keep their trailing text.
        found = upto.find(content.strip(), start)
        after = found + len(content.strip()) if found >= 0 else start
        rest = upto[after:]
        token = next((t for t in self.end_tokens if rest.lstrip().startswith(t)), None)
        if token is not None:
            return len(upto) - len(rest.lstrip()) + len(token)
        stripped = upto.rstrip()
        if len(stripped) > start and stripped.endswith(self.end_tokens):
            return len(stripped)
        return len(upto)

    def _apply(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2 raises TemplateError for `raise_exception(...)`, others for bad data
            raise RowError(f"the chat template failed on this conversation ({type(err).__name__}: {err}).") from None


def _column(field: str, mapping: Mapping[str, str]) -> str:
    column = mapping.get(field, field)
    return f"`{field}`" if column == field else f"`{field}` (column `{column}`)"


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {', '.join(map(str, value)) or 'none'}"
    return f"a {_type(value)}"
