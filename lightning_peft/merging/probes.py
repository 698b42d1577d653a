"""The verification probes: fixed inputs, their logits (in float64 where possible) and the differences measured.

float32 forward passes differ by about 1e-4 on a 135M model's logits just from the order of operations
(x @ W + x @ A @ B against x @ (W + B A)); float64 leaves only what the stored weights change.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_peft.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 1 2 3 4 5",
    "def merge(weights, delta):\n    return weights + delta\n",
)
PROBE_CHAT = "What is the capital of France? Answer in one word."
PROBE_RANDOM = 2  # sequences of random token ids
PROBE_LENGTH = 48  # tokens per probe, at most
PROBE_SEED = 0


class MergeVerificationError(ConfigError):
    """The merged model does not reproduce the adapter model's logits (or has NaN/Inf); nothing was written."""


@dataclass(frozen=True)
class Diff:
    """How far one set of probe logits is from another, and whether the first is all finite."""

    max: float
    mean: float
    finite: bool

    def summary(self) -> dict[str, float | None]:
        return {"max_abs_logit_diff": json_float(self.max), "mean_abs_logit_diff": json_float(self.mean)}


UNMEASURED = Diff(math.nan, math.nan, False)


def json_float(value: float) -> float | None:
    """`value`, or None (JSON null) for NaN and infinities."""
    return value if math.isfinite(value) else None


def probe_inputs(tokenizer: Any, vocab_size: int) -> list[torch.Tensor]:
    """Fixed probes: tokenized text (plain and, with a chat template, a chat turn) and seeded random ids."""
    import torch

    texts = list(PROBE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": PROBE_CHAT}]
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    probes = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROBE_LENGTH]
        if ids and max(ids) < vocab_size:
            probes.append(torch.tensor([ids]))
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probes += [torch.randint(0, vocab_size, (1, PROBE_LENGTH), generator=generator) for _ in range(PROBE_RANDOM)]
    return probes


def logits(model: torch.nn.Module, probes: list[torch.Tensor], exact: bool = True) -> list[torch.Tensor]:
    """Logits for each probe, on the CPU. `exact`: computed in float64, then the weights go back to float32.

    float32 -> float64 -> float32 is lossless. bitsandbytes models cannot run in float64 (`exact=False`).
    """
    import torch

    device = next(model.parameters()).device
    # bitsandbytes' int8 matmul logs a cast warning per layer and call; it says nothing the report does not.
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    bnb_logger.addFilter(_quiet_int8_cast)
    if exact:
        model.to(torch.float64)
    try:
        with torch.no_grad(), _eager_experts(model) if exact else contextlib.nullcontext():
            return [model(input_ids=p.to(device), use_cache=False).logits.cpu() for p in probes]
    finally:
        if exact:
            model.to(torch.float32)
        bnb_logger.removeFilter(_quiet_int8_cast)


def all_finite(tensors: Any) -> bool:
    return all(bool(x.isfinite().all()) for x in tensors)


def diff(measured: list[torch.Tensor], reference: list[torch.Tensor]) -> Diff:
    """The max and mean absolute difference of `measured` from `reference` (in float64)."""
    import torch

    delta = torch.cat([(a.double() - b.double()).abs().flatten() for a, b in zip(measured, reference, strict=True)])
    finite = bool(torch.cat([x.flatten() for x in measured]).isfinite().all())
    return Diff(max=float(delta.max()), mean=float(delta.mean()), finite=finite)


@contextlib.contextmanager
def _eager_experts(model: torch.nn.Module) -> Iterator[None]:
    """Run mixture-of-experts blocks with transformers' eager expert loop inside the block.

    transformers 5 computes fused experts with `torch._grouped_mm` by default, which has no float64 kernel;
    the eager loop computes the same products one expert at a time, in any dtype.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_experts_implementation", None)
    current = getter() if getter is not None else {}
    if not any(impl not in (None, "eager") for impl in current.values()):
        yield
        return
    base.set_experts_implementation("eager")
    try:
        yield
    finally:
        base.set_experts_implementation(current)


def _quiet_int8_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt")
