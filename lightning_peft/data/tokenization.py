"""Rendered text → token ids and labels; truncation and dropping (`preparation.py` runs it over whole files).

Prompts for generation (`prepare_prompts`) go through the same encoder, without labels, cache or dropping: a prompt
that is too long loses its start (left truncation keeps the text that the answer continues).

Labels follow the Hugging Face convention: the same length as `input_ids`, not shifted (the model shifts), -100 where
no loss is taken. The first label of every example is -100 as well: nothing precedes that token, so an unpacked
model never uses it, and in a packed row it would otherwise be "predicted" from the previous example's last token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_peft.data.formats import Prompt, Rendered
from lightning_peft.data.readers import Records
from lightning_peft.data.tokenized import TokenizedData, token_dtype
from lightning_peft.errors import ConfigError, DataError
from lightning_peft.labels import IGNORE_INDEX

log = logging.getLogger(__name__)

_BATCH = 1000  # texts per tokenizer call: the fast tokenizer's batch API is much quicker than one call per text


def tokenize_rendered(
    rendered: Sequence[Rendered],
    tokenizer: Any,
    max_length: int,
    truncation: bool = True,
    fmt: str = "",
    where: Callable[[int], str] = str,
) -> TokenizedData:
    """Tokenize every rendered example, build its labels, then truncate or refuse long ones and drop empty ones.

    Args:
        rendered: the examples from `formats.render_records`.
        tokenizer: a fast Hugging Face tokenizer (character offsets are needed to place the labels).
        max_length: the longest example kept, in tokens.
        truncation: cut longer examples (True) or raise (False).
        fmt: the format name stored with the result.
        where: turns a record index into "file line N" for messages.

    Raises:
        DataError: an example is longer than max_length and truncation is off.
        ConfigError: the tokenizer is not a fast tokenizer, or has no EOS token where one must be appended.
    """
    _require_fast(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None and any(r.append_eos for r in rendered):
        raise ConfigError("The tokenizer has no EOS token to end each example with; set `tokenizer.eos_token`.")
    examples, records, truncated, dropped = [], [], [], []
    for start in range(0, len(rendered), _BATCH):
        chunk = rendered[start : start + _BATCH]
        for j, (ids, offsets) in enumerate(_encode(tokenizer, chunk)):
            i = start + j
            ids, labels = _label(chunk[j], ids, offsets, eos)
            too_long = len(ids) > max_length
            if too_long:
                if not truncation:
                    raise DataError(
                        f"{where(i)}: the example is {len(ids)} tokens long, more than max_length={max_length}; "
                        "raise data.max_length or set data.truncation: true."
                    )
                ids, labels = ids[:max_length], labels[:max_length]
            if not (labels != IGNORE_INDEX).any():
                dropped.append(i)
                continue
            examples.append((ids, labels))
            records.append(i)
            truncated.append(too_long)
    dtype = token_dtype(len(tokenizer))
    return TokenizedData.from_examples(examples, records, truncated, dropped, len(rendered), fmt, dtype)


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"`tokenizer` {type(tokenizer).__name__} is not a fast (Rust) tokenizer; the supervised tokens are "
            "located by character offsets, which only fast tokenizers give. Load it with use_fast=True."
        )


def _encode(tokenizer: Any, chunk: Sequence[Rendered | Prompt]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    out = []
    # One file has one format, but group by the flag anyway so the batch API can be used in every case.
    for flag in (True, False):
        positions = [k for k, r in enumerate(chunk) if r.special_tokens == flag]
        if not positions:
            continue
        encoded = tokenizer(
            [chunk[k].text for k in positions],
            add_special_tokens=flag,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,  # no "sequence longer than model_max_length" warning: truncation is ours
        )
        out.extend(zip(positions, zip(encoded["input_ids"], encoded["offset_mapping"], strict=True), strict=True))
    return [pair for _, pair in sorted(out, key=lambda item: item[0])]


def _label(
    example: Rendered, ids: list[int], offsets: list[tuple[int, int]], eos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and labels of one example; EOS appended and learned when the format asks for it."""
    ids_arr = np.asarray(ids, dtype=np.int32)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    supervised = np.full(len(ids_arr), example.supervise_all, dtype=bool)
    for start, end in example.spans:
        # A token is supervised when any of its characters lies in the span; special tokens the tokenizer adds
        # (BOS) have the empty span (0, 0) and never are.
        supervised |= (spans[:, 1] > spans[:, 0]) & (spans[:, 0] < end) & (spans[:, 1] > start)
    if example.append_eos:
        # Labels are built here, never from `== pad_token_id`: SmolLM2 pads with its EOS, which must be learned.
        if len(ids_arr) and ids_arr[-1] == eos:
            supervised[-1] = True
        else:
            ids_arr = np.append(ids_arr, np.int32(eos))
            supervised = np.append(supervised, True)
    labels = np.where(supervised, ids_arr, IGNORE_INDEX).astype(np.int32)
    if len(labels):
        labels[0] = IGNORE_INDEX
    return ids_arr, labels


@dataclass
class TokenizedPrompts:
    """The prompts of one file, one per row, in file order.

    Attributes:
        input_ids: the token ids of each prompt (int32 arrays).
        references: each row's answer when the file holds one, else None.
        truncated: whether each prompt lost its start to max_length (bool).
        format: the data format used (after auto-detection).
    """

    input_ids: list[np.ndarray]
    references: list[str | None]
    truncated: np.ndarray
    format: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int64)

    def stats(self) -> dict[str, int]:
        """Counts for logs and `SFTDataModule.stats`."""
        return {"prompts": len(self), "tokens": int(self.lengths.sum()), "truncated": int(self.truncated.sum())}


def tokenize_prompts(
    prompts: Sequence[Prompt],
    tokenizer: Any,
    max_length: int,
    truncation: bool = True,
    fmt: str = "",
    where: Callable[[int], str] = str,
) -> TokenizedPrompts:
    """Tokenize prompts for generation: no labels, no EOS, and long prompts cut from the left or refused.

    Raises:
        DataError: a prompt is longer than max_length with truncation off, or has no token at all.
        ConfigError: the tokenizer is not a fast tokenizer.
    """
    _require_fast(tokenizer)
    eos = tokenizer.eos_token_id
    ids_out, truncated = [], []
    for start in range(0, len(prompts), _BATCH):
        chunk = prompts[start : start + _BATCH]
        for j, (ids, offsets) in enumerate(_encode(tokenizer, chunk)):
            i = start + j
            # A post-processor that appends EOS (as for plain-text training) would tell the model to stop at once.
            if len(ids) > 1 and ids[-1] == eos and tuple(offsets[-1]) == (0, 0):
                ids = ids[:-1]
            if not ids:
                raise DataError(f"{where(i)}: the prompt is empty; give every row a prompt to continue.")
            too_long = len(ids) > max_length
            if too_long and not truncation:
                raise DataError(
                    f"{where(i)}: the prompt is {len(ids)} tokens long, more than max_length={max_length}; "
                    "raise data.max_length or set data.truncation: true (keeps the last max_length tokens)."
                )
            ids_out.append(np.asarray(ids[-max_length:], dtype=np.int32))
            truncated.append(too_long)
    return TokenizedPrompts(
        input_ids=ids_out,
        references=[p.reference for p in prompts],
        truncated=np.asarray(truncated, dtype=bool),
        format=fmt,
    )


def prepare_prompts(
    path: str | Records,
    *,
    fmt: str,
    columns: Mapping[str, str],
    max_length: int,
    truncation: bool,
    tokenizer: Any,
    roles: Mapping[str, str] | None = None,
) -> TokenizedPrompts:
    """Read one file of prompts (or take the records given) with the training formats and tokenize them (never cached).

    Raises:
        DataError: the file is missing or malformed, or a prompt is too long with truncation off.
    """
    from lightning_peft.data.formats import render_prompts
    from lightning_peft.data.readers import read_records

    records = path if isinstance(path, Records) else read_records(path)
    used, prompts = render_prompts(records, fmt, columns, tokenizer, roles)
    return tokenize_prompts(prompts, tokenizer, max_length, truncation, used, records.where)
