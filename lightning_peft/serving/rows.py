"""The rows of a served batch: which adapter each row uses, prompts to a padded batch, generation settings, and
the rows of adapters run apart put back in order. No model state here: `AdapterServer` passes in what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_peft.data.chat_templates import stop_token_ids
from lightning_peft.errors import ConfigError

if TYPE_CHECKING:
    import torch

BASE = "__base__"  # PEFT's name for "no adapter" in `adapter_names`
BASE_ALIASES = (None, "base", BASE)

Prompt = str | list[dict[str, str]]


def row_adapters(adapters: str | Sequence[str | None] | None, size: int, active: str | None) -> list[str]:
    """One adapter name per row (`BASE` for the base alone) from `forward`'s / `generate`'s `adapters`.

    Raises:
        ConfigError: a list whose length is not the batch's.
    """
    if adapters is None:
        rows = [active] * size
    elif isinstance(adapters, str):
        rows = [adapters] * size
    else:
        rows = list(adapters)
        if len(rows) != size:
            raise ConfigError(f"`adapters` names {len(rows)} adapters for a batch of {size} rows; give one per row.")
    return [BASE if r in BASE_ALIASES else r for r in rows]


def encode_prompts(
    tokenizer: Any, prompts: Sequence[Prompt], device: Any, templates: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids`/`attention_mask` on `device`; with `templates`, each row's chat template renders it."""
    if templates is not None:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}] if isinstance(p, str) else p,
                chat_template=template,
                add_generation_prompt=True,
                tokenize=False,
            )
            for p, template in zip(prompts, templates, strict=True)
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}


def with_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with `position_ids` that count real tokens only, so a left-padded row sees the positions it would
    have alone."""
    batch = dict(batch)
    if "attention_mask" in batch and "position_ids" not in batch:
        batch["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return batch


def check_generation(prompts: Sequence[Prompt], max_new_tokens: int, temperature: float, streamer: Any) -> None:
    """Refuse generation settings that cannot work, before anything runs."""
    if temperature < 0 or max_new_tokens < 1:
        raise ConfigError(f"`temperature`={temperature} must be ≥ 0 and `max_new_tokens`={max_new_tokens} at least 1.")
    if streamer is not None and len(prompts) != 1:
        raise ConfigError(f"A streamer follows one prompt at a time; got {len(prompts)} prompts.")


def generation_settings(
    tokenizer: Any,
    max_new_tokens: int,
    temperature: float,
    streamer: Any,
    kwargs: dict[str, Any],
    chat_templates: set[str] | None = None,
    generation_config: Any = None,
) -> dict[str, Any]:
    """The `generate` arguments: greedy at temperature 0, padding with the pad (else EOS) token, and for chat
    prompts (`chat_templates`) stopping at their templates' end-of-turn tokens unless `kwargs` say otherwise."""
    kwargs = dict(kwargs)
    if chat_templates is not None and "eos_token_id" not in kwargs:
        # Chat replies end on their template's end-of-turn token, which may not be EOS (chatml on a base).
        kwargs["eos_token_id"] = stop_token_ids(tokenizer, chat_templates, generation_config)
    pad = tokenizer.pad_token_id
    return dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.eos_token_id if pad is None else pad,
        streamer=streamer,
        **({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}),
        **kwargs,
    )


def group_rows(rows: list[str]) -> dict[str, list[int]]:
    """Row indices by adapter, in the order the adapters first appear."""
    found: dict[str, list[int]] = {}
    for index, name in enumerate(rows):
        found.setdefault(name, []).append(index)
    return found


def stitch_rows(parts: dict[str, torch.Tensor], by_adapter: dict[str, list[int]], size: int, fill: Any = None) -> Any:
    """The per-adapter outputs `parts` (rows first) back in row order; shorter ones padded with `fill` on the right
    (generated ids), or all of one length (logits) when `fill` is None."""
    import torch

    first = next(iter(parts.values()))
    if fill is None:
        out = first.new_empty((size, *first.shape[1:]))
    else:
        out = torch.full((size, max(p.shape[1] for p in parts.values())), fill)
    for name, index in by_adapter.items():
        out[index, : parts[name].shape[1]] = parts[name].to(out.device)
    return out
