"""The benchmark's models: the real SmolLM2-135M-Instruct, or random-init Llamas of a few shapes built offline.

Random weights are fine for a speed benchmark (the cost of a step does not depend on the values) and are all a
machine without downloads can have. They pair with a byte-level tokenizer (`lightning_peft.testing`, one token per
byte, as in the tests), whatever the vocabulary size of the shape: the embedding and LM head cost what the
shape says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Llama shapes. `1b` is Llama-3.2-1B's (1.24B parameters, tied embeddings, 128k vocabulary).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}
SMOLLM2 = "smollm2-135m-instruct"


def prepare_model(shape: str, folder: Path, device: str = "cpu") -> Path:
    """A model folder for `shape`: SmolLM2's cached safetensors folder, or a random Llama saved into `folder`."""
    if shape == SMOLLM2:
        from lightning_peft.models import resolve_model

        return Path(resolve_model(SMOLLM2))
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; use {SMOLLM2} or one of {', '.join(SHAPES)}")
    return save_random_llama(folder, SHAPES[shape], device)


def save_random_llama(folder: Path, shape: dict[str, Any], device: str = "cpu") -> Path:
    """Write a seeded random-init Llama of `shape` (bf16 when it has over 100M parameters) and a byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_peft.testing import byte_tokenizer

    tokenizer = byte_tokenizer()
    settings = {"vocab_size": len(tokenizer), "tie_word_embeddings": False, **shape}
    config = LlamaConfig(
        **settings, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2, use_cache=False
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if model.num_parameters() > 100_000_000:
        model = model.to(torch.bfloat16)  # half the bytes to write and read; each system loads it in its own dtype
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
