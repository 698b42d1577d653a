"""Tokens the vocabulary gained for a chat template: new embedding rows, trained alone, carried by the adapter.

`data.chat_template` adds the special tokens a template writes that the base's vocabulary lacks
(`lightning_peft.data.chat_templates`). The base then gets embedding rows for them (`grow_embeddings`), and the
adapter trains those rows only, through PEFT's trainable tokens (`with_trainable_tokens`): the base's own weights
never change and the adapter saves just the new rows. The tokenizer saved next to the adapter holds the template
and the tokens, and its length is the row count a base needs before PEFT can load the adapter
(`tokenizer_source`, `grow_embeddings`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig


def tokenizer_source(model_name_or_path: str, adapter_path: str | os.PathLike | None = None) -> str:
    """Where a run's tokenizer comes from: the adapter folder when it holds one (the chat template and added tokens
    it was trained with travel there), else the base model."""
    if adapter_path is not None and (Path(adapter_path) / "tokenizer_config.json").is_file():
        return str(adapter_path)
    return model_name_or_path


def grow_embeddings(model: torch.nn.Module, vocab_size: int) -> bool:
    """Give `model` at least `vocab_size` token rows (input embeddings, and lm_head when it is not tied).

    Never shrinks: vocabularies padded beyond the tokenizer keep their rows, and the new tokens use spare ones.
    New rows start from the mean and covariance of the old ones (transformers' `mean_resizing`).

    Returns:
        Whether the model was resized.
    """
    if vocab_size <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(vocab_size)
    return True


def with_trainable_tokens(config: PeftConfig, model: torch.nn.Module, token_ids: list[int]) -> PeftConfig:
    """`config` that also trains the rows of `token_ids` in the input embeddings and in an untied lm_head.

    With tied embeddings PEFT ties the lm_head to the input embeddings' trainable rows itself; an untied lm_head
    gets its own rows, so the new tokens can be predicted too. Indices the config already trains are kept.

    Raises:
        ConfigError: the adapter method has no trainable tokens (only LoRA has, in peft 0.21).
    """
    if not token_ids:
        return config
    if not any(f.name == "trainable_token_indices" for f in dataclasses.fields(config)):
        raise ConfigError(
            f"`data.chat_template` adds {len(token_ids)} tokens to the vocabulary, whose embeddings only a LoRA "
            f"adapter can train (trainable_token_indices), but `adapter` is {type(config).__name__}; use LoRA, or "
            "a template whose tokens the tokenizer already has."
        )
    layers = {_module_name(model, model.get_input_embeddings()): token_ids}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        layers[_module_name(model, output)] = token_ids
    existing = config.trainable_token_indices
    if isinstance(existing, list):
        existing = {next(iter(layers)): existing}
    for name, ids in (existing or {}).items():
        layers[name] = sorted({*layers.get(name, []), *ids})
    # A plain list (input embeddings only) when that is all: PEFT then also ties the lm_head when weights are tied.
    indices: Any = layers[next(iter(layers))] if len(layers) == 1 else layers
    return dataclasses.replace(config, trainable_token_indices=indices)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)
