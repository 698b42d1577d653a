"""Offline building blocks for tests and benchmarks: a tokenizer that needs no download.

`byte_tokenizer()` pairs with any random-init model built in code (lightning-peft's own tests and benchmarks use
it, and so can a project's tests of its `PeftCausalLM` subclass): one token per byte, so every text encodes, plus
ChatML's special tokens and chat template, so `messages` data and `--chat` prompts work as with a real model.
`byte_tokenizer(chat=False)` is a base model's tokenizer instead: Llama's `<unk>`, `<s>`, `</s>` and no chat
template, as for the tests of `data.chat_template`.
"""

from __future__ import annotations

from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def byte_tokenizer(chat: bool = True) -> Any:
    """A byte-level BPE tokenizer without merges: 3 special tokens (ids 0-2), then the 256 bytes.

    Args:
        chat: ChatML's tokens (unk, bos = `<|im_start|>`, eos = pad = `<|im_end|>`) and chat template; False gives
            Llama's `<unk>`, `<s>`, `</s>` (eos = pad = `</s>`) and no chat template, as a base model has.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS if chat else BASE_SPECIAL_TOKENS
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    unk, bos, eos = specials
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=unk
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
