"""Mixed-adapter batches in four tensor ops per LoRA layer, however many adapters the batch mixes.

PEFT's mixed batches (`adapter_names`) loop over the batch's adapters inside every LoRA layer: a gather, two
matmuls, a scale and a scatter-add per adapter. Decoding a small batch is bound by the number of ops, so with 4
adapters that path took about twice the time of a single adapter per step on SmolLM2 (CPU). Here each LoRA
layer gets the batch's adapters concatenated once per call, as PEFT's exact `cat` combination does
(A = [A₁; …; Aₖ], B = [s₁B₁ … sₖBₖ]), and a forward hook adds `((x Aᵀ) ⊙ mask) Bᵀ`, where the mask keeps, for each
row, only the rank columns of that row's adapter (none for a base row). Every row gets exactly its own delta;
the cost is two small matmuls over Σ rᵢ columns, read once per step.

Plain LoRA on linear layers only: DoRA, LoRA biases, embedding LoRA and other variants keep PEFT's path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def batchable(layers: Sequence[Any], names: Sequence[str]) -> bool:
    """Whether every LoRA layer holds `names` as plain LoRA on a linear layer (what the concatenation computes)."""
    import torch
    from peft.tuners.lora import ParamWrapper

    for layer in layers:
        present = [n for n in names if n in getattr(layer, "lora_A", {})]
        if present and isinstance(layer, ParamWrapper):  # MoE experts see routed tokens, not the batch's rows
            return False
        if any(n in getattr(layer, "lora_embedding_A", {}) for n in names):
            return False
        for name in present:
            if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_A[name], torch.nn.Linear):
                return False
            if layer.lora_B[name].bias is not None:
                return False
    return True


class ConcatenatedLora:
    """The LoRA weights of some adapters, concatenated per layer: A over the rank rows, B (scaled) over columns.

    Args:
        layers: PEFT's LoRA layers.
        names: The adapters to hold, in slot order.
    """

    def __init__(self, layers: Sequence[Any], names: Sequence[str]) -> None:
        import torch

        self.names = tuple(names)
        # layer → (A [Σr, in], B [out, Σr], the slot of each rank column)
        self.weights: dict[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for layer in layers:
                present = [(slot, n) for slot, n in enumerate(self.names) if n in getattr(layer, "lora_A", {})]
                if not present:
                    continue
                a = torch.cat([layer.lora_A[n].weight for _, n in present], dim=0)
                b = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for _, n in present], dim=1)
                columns = torch.cat([torch.full((layer.r[n],), slot, device=a.device) for slot, n in present])
                self.weights[layer] = (a, b, columns)

    @contextlib.contextmanager
    def applied(self, rows: Sequence[str | None]) -> Iterator[None]:
        """Add each row's LoRA delta in every layer (rows named None, or not held here, get none).

        PEFT's own adapters must be switched off in the layers meanwhile, or they would add theirs too.
        """
        import torch

        slots = {name: slot for slot, name in enumerate(self.names)}
        row_slots = [slots.get(r, -1) for r in rows] if rows else []
        handles = []
        try:
            for layer, (a, b, columns) in self.weights.items():
                index = torch.tensor(row_slots, device=columns.device)
                mask = (index[:, None] == columns[None, :]).to(a.dtype)  # [rows, Σr]
                handles.append(layer.register_forward_hook(partial(_add_delta, a=a, b=b, mask=mask)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _add_delta(
    module: Any, args: tuple[Any, ...], output: torch.Tensor, *, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    import torch.nn.functional as F

    x = args[0]
    if x.shape[0] != mask.shape[0]:
        raise RuntimeError(f"a mixed batch of {mask.shape[0]} rows reached a layer with {x.shape[0]} rows")
    row_mask = mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
    delta = F.linear(F.linear(x.to(a.dtype), a) * row_mask, b)
    return output + delta.to(output.dtype)
