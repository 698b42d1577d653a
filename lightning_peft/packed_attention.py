"""Attention for packed rows, one document at a time: no (T x T) mask, nothing quadratic kept for backward.

A packed row carries `position_ids` that restart at 0 for each example and no attention mask. transformers' sdpa
backend turns that into a dense block-diagonal (B, 1, T, T) mask, and PyTorch's SDPA then keeps a float copy of it
for backward in every layer (and repeats the grouped key/value heads, since it cannot use GQA with a mask): memory
that grows with T² (at 1 x 8192 tokens, 256 MiB per layer). `lpeft_packed` instead finds the documents of the
batch once from the position ids (where a position does not follow the previous one, as transformers'
`find_packed_sequence_indices` does), gathers the documents of equal length into one batch and runs
`scaled_dot_product_attention(is_causal=True)` on it: PyTorch's flash kernels (CPU and CUDA) then keep only a
log-sum-exp per query for backward, so memory grows linearly in T. Every other call (a padding mask, one document
per row, a KV cache) goes to transformers' own sdpa function unchanged.

It is an `AttentionInterface` backend, so it serves every model class whose attention goes through that interface
(`_supports_attention_backend`: Llama, Qwen2/3, Mistral, Gemma, Phi-3 ...). A layer with a sliding window whose
documents are longer than the window gets the exact block-diagonal sliding mask instead (the quadratic path, as
before); softcapping models (Gemma 2) run eager attention and are never switched.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_peft.models import packed_examples_are_isolated

log = logging.getLogger(__name__)

PACKED_ATTENTION = "lpeft_packed"


@dataclass(frozen=True)
class DocumentPlan:
    """The documents of a packed batch, gathered by length.

    Attributes:
        groups: for each document length L, the (n, L) indices of its n documents' tokens in the flattened batch.
        order: for each token of the flattened batch, its place in the concatenated outputs of the groups.
        doc_ids: (B, T) document number of each token (counted over the whole row), for masks of fallbacks.
        longest: the longest document's length.
    """

    groups: list[tuple[int, torch.Tensor]]
    order: torch.Tensor
    doc_ids: torch.Tensor
    longest: int


def document_plan(position_ids: torch.Tensor, batch_size: int) -> DocumentPlan | None:
    """The documents of each row, from positions that restart; None when every row holds one document."""
    positions = position_ids.expand(batch_size, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    if not starts[:, 1:].any():
        return None
    first = starts.flatten().nonzero().squeeze(1)  # each row starts a document, so none spans two rows
    lengths = torch.diff(first, append=first.new_tensor([positions.numel()]))
    groups = []
    for length in lengths.unique().tolist():
        begin = first[lengths == length]
        groups.append((length, begin[:, None] + torch.arange(length, device=begin.device)))
    gathered = torch.cat([index.flatten() for _, index in groups])
    order = torch.empty_like(gathered)
    order[gathered] = torch.arange(gathered.numel(), device=gathered.device)
    return DocumentPlan(groups, order, starts.cumsum(-1), int(lengths.max()))


class _PlanCache:
    """The plan of the last position_ids seen: every layer of a forward pass gets the same tensor."""

    def __init__(self) -> None:
        self._key: tuple[Any, int, int] | None = None
        self._plan: DocumentPlan | None = None

    def get(self, position_ids: torch.Tensor, batch_size: int) -> DocumentPlan | None:
        key = self._key
        if key is None or key[0]() is not position_ids or key[1:] != (position_ids._version, batch_size):
            self._plan = document_plan(position_ids, batch_size)
            self._key = (weakref.ref(position_ids), position_ids._version, batch_size)
        return self._plan


_PLANS = _PlanCache()


# Stays eager inside a compiled decoder layer (`lightning_peft.compiling`): documents differ in every batch.
@torch.compiler.disable
def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, T, D) inputs, (B, T, H, D) output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = _packed_plan(module, query, key, attention_mask, kwargs)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    window = kwargs.get("sliding_window")
    if window is not None and plan.longest > window:
        # The window cuts into a document: the exact mask, quadratic like transformers' own packed path.
        return sdpa_attention_forward(
            module, query, key, value, _sliding_mask(plan, window), dropout, scaling, **kwargs
        )
    return _per_document(module, query, key, value, plan, dropout, scaling), None


def _packed_plan(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict
) -> DocumentPlan | None:
    """The batch's documents when this call attends packed rows causally without a cache; else None."""
    position_ids = kwargs.get("position_ids")
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if mask is not None or position_ids is None or not causal or query.shape[2] != key.shape[2]:
        return None
    return _PLANS.get(position_ids, query.shape[0])


def _per_document(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: DocumentPlan,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    batch, heads, length, _ = query.shape
    tokens = [x.transpose(1, 2).flatten(0, 1) for x in (query, key, value)]  # (B·T, heads, D)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outputs = []
    for _, index in plan.groups:
        q, k, v = (x[index].transpose(1, 2) for x in tokens)  # (documents, heads, L, D)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        outputs.append(out.transpose(1, 2).flatten(0, 1))
    return torch.cat(outputs)[plan.order].view(batch, length, heads, -1)


def _sliding_mask(plan: DocumentPlan, window: int) -> torch.Tensor:
    """(B, 1, T, T) boolean: same document, causal, and within `window` (transformers' sliding-window rule)."""
    ids = plan.doc_ids
    q_pos = torch.arange(ids.shape[1], device=ids.device)
    distance = q_pos[:, None] - q_pos[None, :]
    same = ids[:, :, None] == ids[:, None, :]
    return (same & (distance >= 0) & (distance < window))[:, None]


def packed_attention_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """The mask builder paired with `lpeft_packed`: sdpa's mask for padded batches, none otherwise.

    Without a padding mask, `packed_attention_forward` finds documents (or plain causal rows) from the position
    ids itself, so the (T x T) mask transformers would build for packed rows is never made.
    """
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `lpeft_packed` a transformers attention backend (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_attention_mask)


def packed_attention_blocker(model: torch.nn.Module) -> str | None:
    """Why `model` cannot switch to `lpeft_packed` (None when it can): only sdpa models on the attention interface."""
    config = model.config
    backend = getattr(config, "_attn_implementation", None)
    if backend == PACKED_ATTENTION:
        return None
    if backend != "sdpa":
        return f"it runs {backend!r} attention, not sdpa"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
    if getattr(config, "sub_configs", None):
        return f"{type(model).__name__} has sub-models (multimodal)"
    return None


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch `model` (a transformers model, PEFT-wrapped or not) to `lpeft_packed`; False when it cannot."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocker = packed_attention_blocker(base)
    if blocker is not None:
        log.info("Packed rows keep transformers' block-diagonal mask (quadratic in length): %s.", blocker)
        return False
    register()
    previous = base.config._attn_implementation
    base.set_attn_implementation(PACKED_ATTENTION)
    # A model class that does not hand position_ids to its attention function would now mix packed examples.
    if not packed_examples_are_isolated(model, device=base.device):
        base.set_attn_implementation(previous)
        log.info("Packed rows keep transformers' block-diagonal mask: %s does not pass position_ids.", type(base))
        return False
    return True
