"""The tokenizer and chat template an adapter folder brings to a server that holds one vocabulary for all.

An adapter trained with `data.chat_template` saves the tokenizer it was trained with: its template, and any
tokens the template added (`lightning_peft.tokens`). The server renders that adapter's chat prompts with its
template; when its vocabulary extends the server's, the server adopts it (and grows the base's embeddings), which
is possible only before any adapter is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError


def adapter_tokenizer(
    folder: Path, name: str, base_name: str, current: Any, *, can_grow: bool
) -> tuple[str | None, Any | None]:
    """(the adapter's chat template, the tokenizer the server must adopt), each None when there is none.

    The adopted tokenizer keeps `current`'s chat template: `AdapterServer.tokenizer.chat_template` stays the
    base's, for rows of the base alone.

    Raises:
        ConfigError: the adapter's vocabulary is neither part of the server's nor, while no adapter is loaded,
            an extension of it.
    """
    from lightning_peft.models import load_tokenizer
    from lightning_peft.tokens import tokenizer_source

    if tokenizer_source(base_name, folder) == base_name:
        return None, None
    tokenizer = load_tokenizer(str(folder))
    vocab, ours = tokenizer.get_vocab(), current.get_vocab()
    if _includes(ours, vocab):  # the same vocabulary, or the base's when the server grew it for another adapter
        return tokenizer.chat_template, None
    if not (can_grow and _includes(vocab, ours)):
        raise ConfigError(
            f"Adapter {name!r} ({folder}) was trained with a vocabulary of {len(vocab)} tokens that this server's "
            f"({len(ours)} tokens) cannot hold; load an adapter that adds tokens (data.chat_template) first, or "
            "serve it with another AdapterServer."
        )
    template = tokenizer.chat_template
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    tokenizer.chat_template = current.chat_template
    return template, tokenizer


def _includes(vocab: dict[str, int], other: dict[str, int]) -> bool:
    """Whether `vocab` holds every token of `other` under the same id."""
    return all(vocab.get(token) == i for token, i in other.items())
