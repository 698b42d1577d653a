"""A tiny random Llama and a byte-level tokenizer with a ChatML template, built offline in code."""

from __future__ import annotations

from pathlib import Path

from lightning_peft.testing import byte_tokenizer as build_tokenizer

__all__ = ["build_model", "build_tokenizer", "save_tiny_model"]


def build_model(vocab_size: int, seed: int = 0, tie_word_embeddings: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(folder: str | Path, seed: int = 0, chat: bool = True, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny Llama (about 30k parameters) and its tokenizer to `folder`; return the folder.

    `chat=False` gives it a base model's tokenizer: no chat template, no ChatML tokens (`byte_tokenizer`).
    """
    folder = Path(folder)
    tokenizer = build_tokenizer(chat=chat)
    model = build_model(len(tokenizer), seed=seed, tie_word_embeddings=tie_word_embeddings)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
