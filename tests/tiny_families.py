"""Tiny random causal LMs of each decoder family lightning-peft supports, built offline from config classes.

Every model has 2 layers, a hidden size of 32-64 and the byte tokenizer's vocabulary (`lightning_peft.testing`),
so it trains, merges and generates in well under a second per step on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_peft.testing import byte_tokenizer

VOCAB = 259  # the byte tokenizer: 3 special tokens + 256 bytes
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2, vocab_size=VOCAB, tie_word_embeddings=False)
_LLAMA_LIKE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    **_IDS,
)
_MOE = dict(num_experts_per_tok=2)


def _config(class_name: str, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        return getattr(transformers, class_name)(**kwargs)

    return build


# family → a function that builds its config (the model class is what AutoModelForCausalLM maps it to).
FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": _config("LlamaConfig", **_LLAMA_LIKE),
    "mistral": _config("MistralConfig", **_LLAMA_LIKE, sliding_window=None),
    "qwen2": _config("Qwen2Config", **_LLAMA_LIKE),
    "qwen3": _config("Qwen3Config", **_LLAMA_LIKE, head_dim=8),
    "gemma2": _config("Gemma2Config", **_LLAMA_LIKE, head_dim=8, sliding_window=16),
    "gemma3": _config("Gemma3TextConfig", **_LLAMA_LIKE, head_dim=8, sliding_window=16),
    "phi3": _config("Phi3Config", **_LLAMA_LIKE),
    "olmo2": _config("Olmo2Config", **_LLAMA_LIKE),
    "gpt2": _config("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=256, **_IDS),
    "gpt_neo": _config(
        "GPTNeoConfig",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=16,
        max_position_embeddings=256,
        **_IDS,
    ),
    "falcon": _config("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **_IDS),
    "bloom": _config("BloomConfig", hidden_size=32, n_layer=2, n_head=4, **_IDS),
    "gpt_neox": _config(
        "GPTNeoXConfig",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        **_IDS,
    ),
    "mixtral": _config("MixtralConfig", **_LLAMA_LIKE, num_local_experts=4, **_MOE),
    "qwen3_moe": _config("Qwen3MoeConfig", **_LLAMA_LIKE, head_dim=8, num_experts=4, moe_intermediate_size=32, **_MOE),
}


def build_family_model(family: str, seed: int = 0) -> Any:
    """A randomly initialised causal LM of `family` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family]())


def save_family_model(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny `family` model and the byte tokenizer to `folder`; return the folder."""
    folder = Path(folder)
    build_family_model(family, seed).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
