"""Generation with a fine-tuned model outside serving: prompts in, text out (`PeftCausalLM.generate`, `predict_step`).

No Lightning here: the module passes its tokenizer and model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_peft.data import chat_templates

if TYPE_CHECKING:
    import torch

PREDICT_DEFAULTS = {"max_new_tokens": 128, "do_sample": False}
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")


def prediction_settings(tokenizer: Any, model: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """`generate` arguments for a predict batch: greedy, up to 128 new tokens, unless `overrides` say otherwise."""
    settings = {**PREDICT_DEFAULTS, **overrides}
    if tokenizer.chat_template:
        # Chat replies end on the template's end-of-turn token, which may not be EOS (chatml on a base model).
        stops = chat_templates.stop_token_ids(tokenizer, generation_config=model.generation_config)
        settings.setdefault("eos_token_id", stops)
    if not settings["do_sample"]:
        # Sampling settings under greedy decoding only make transformers warn.
        settings = {k: v for k, v in settings.items() if k not in _SAMPLING_ONLY}
    return settings


def prediction_rows(
    tokenizer: Any, batch: dict[str, Any], attention_mask: torch.Tensor, new_tokens: torch.Tensor
) -> list[dict[str, Any]]:
    """One dict per row of a predict batch: index, prompt, completion and, when the batch has it, reference."""
    size = len(new_tokens)
    # Batches from other dataloaders may lack `index` (None then: the writer keeps their arrival order).
    indices = batch["index"].tolist() if "index" in batch else [None] * size
    references = batch.get("reference") or [None] * size
    rows = []
    for i, index in enumerate(indices):
        row = {
            "index": index,
            "prompt": tokenizer.decode(batch["input_ids"][i][attention_mask[i].bool()]),
            "completion": tokenizer.decode(new_tokens[i], skip_special_tokens=True),
        }
        if references[i] is not None:
            row["reference"] = references[i]
        rows.append(row)
    return rows


def generate_reply(
    model: Any, tokenizer: Any, prompt: str | list[dict[str, str]], device: Any, max_new_tokens: int, **kwargs: Any
) -> str:
    """The reply to `prompt` (plain text, or chat messages rendered with the chat template); greedy by default.

    Plain text goes through the chat template too when the tokenizer has one. The model is put in eval mode for
    the call and back in its former mode after.
    """
    if isinstance(prompt, str) and tokenizer.chat_template:
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    encoded = encoded.to(device)
    was_training = model.training
    model.eval()
    try:
        kwargs.setdefault("do_sample", False)
        if isinstance(prompt, list):
            stops = chat_templates.stop_token_ids(tokenizer, generation_config=model.generation_config)
            kwargs.setdefault("eos_token_id", stops)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
