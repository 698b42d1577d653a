"""Gradient checkpointing: off, every decoder layer (`true`), or only the MLPs' intermediates (`selective`).

Without checkpointing, most of what a decoder layer's backward keeps is its MLP's: the gate and up projections'
outputs, the activation and the product (each `intermediate_size` wide, about 2.7x the hidden size), the
product again as the down projection's LoRA input, and one dropped-out copy per adapted input when
`lora_dropout > 0` (docs/performance.md has the census). `selective` recomputes the gate/up projections, the
activation and the product in the backward from the MLP's input, which is all it keeps; the down projection's
base matmul is not recomputed (its frozen weight needs no input to backpropagate). Attention, whose recompute
costs the most per byte saved, keeps its activations. Full checkpointing keeps only each layer's input and
recomputes everything.

Other MLP shapes (GPT-2, GPT-NeoX, Falcon, Bloom, Phi-3's fused gate/up, mixture-of-experts blocks) are
checkpointed whole under `selective`: the MLP keeps only its input and runs its forward again in the backward.
Only a decoder whose layers have no `mlp` module falls back to checkpointing every layer.

Both use torch's non-reentrant checkpoint, which needs no input that requires grad: the embedding-output hook
transformers and PEFT add for the reentrant kind is removed, so layer 0 computes no gradient nobody uses.
Dropout masks are the same in the recompute (the checkpoint restores the RNG state).
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from lightning_peft.errors import ConfigError
from lightning_peft.options import GradientCheckpointing

log = logging.getLogger(__name__)

SELECTIVE = "selective"
#: The values `gradient_checkpointing` accepts, for messages.
CHOICES = "false, true or 'selective'"
# The parts of a gated (SwiGLU / GeGLU) MLP, as Llama, Mistral, Qwen2/3, Gemma 1-3, SmolLM2, OLMo 2 name them.
_GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def setting_problem(value: Any) -> str | None:
    """What is wrong with a `gradient_checkpointing` value, or None when it is false, true or "selective"."""
    if isinstance(value, bool) or value == SELECTIVE:
        return None
    return f"`gradient_checkpointing`={value!r} is not allowed; use {CHOICES}"


def check_setting(value: Any) -> None:
    """Raise a one-line ConfigError unless `value` is false, true or "selective"."""
    if problem := setting_problem(value):
        raise ConfigError(problem + ".")


def layer_mlps(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """Each decoder layer's MLP (its `mlp` module, mixture-of-experts blocks included), or None when some layer
    has none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    mlps = [getattr(layer, "mlp", None) for layer in layers]
    if not layers or any(not isinstance(mlp, torch.nn.Module) for mlp in mlps):
        return None
    return mlps


def is_gated(mlp: torch.nn.Module) -> bool:
    """Whether `mlp` is a gated (SwiGLU / GeGLU) MLP with separate gate and up projections."""
    return all(hasattr(mlp, part) for part in _GATED_MLP_PARTS)


def enable(model: torch.nn.Module, setting: GradientCheckpointing) -> None:
    """Turn on `setting` for `model` (a transformers model, before or after PEFT injection)."""
    check_setting(setting)
    if setting == SELECTIVE:
        mlps = layer_mlps(model)
        if mlps is not None:
            for mlp in mlps:
                if is_gated(mlp):
                    mlp.forward = types.MethodType(_selective_forward, mlp)
                else:
                    mlp.forward = _recomputed_in_backward(mlp, mlp.forward)
            return
        log.warning(
            "`gradient_checkpointing: selective` recomputes each decoder layer's `mlp` module; %s has decoder "
            "layers without one, so every layer is checkpointed instead (as with `true`).",
            type(model).__name__,
        )
    if setting:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.disable_input_require_grads()  # only the reentrant checkpoint needs inputs that require grad
    if setting is not False:
        model.config.use_cache = False


def _recomputed_in_backward(module: torch.nn.Module, forward: Any) -> Any:
    """`forward` keeping only its inputs while `module` trains: the backward runs it again (same RNG state)."""

    def forward_recomputed_in_backward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and module.training:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return forward_recomputed_in_backward


def _gated_product(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def _selective_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward, keeping only `x` for its backward: everything else is recomputed from it."""
    if not (torch.is_grad_enabled() and mlp.training):
        return mlp.down_proj(_gated_product(mlp, x))
    down = mlp.down_proj
    if not _plain_lora(down):
        return checkpoint(lambda inputs: down(_gated_product(mlp, inputs)), x, use_reentrant=False)
    # The frozen base matmul needs no saved input: run it once, outside; recompute only what keeps tensors.
    product, delta = checkpoint(_product_and_lora_delta, mlp, x, use_reentrant=False)
    base_out = down.base_layer(product)
    return (base_out + delta).to(base_out.dtype)


def _product_and_lora_delta(mlp: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
    product = _gated_product(mlp, x)
    return product, _lora_delta(mlp.down_proj, product)


def _plain_lora(layer: torch.nn.Module) -> bool:
    """Whether `layer` is PEFT's float `lora.Linear` running plain LoRA adapters (no DoRA or other variant)."""
    from peft.tuners.lora.layer import Linear

    return (
        type(layer) is Linear
        and not layer.merged
        and not layer.disable_adapters
        and not any(name in layer.lora_variant for name in layer.active_adapters)
    )


def _lora_delta(layer: Any, inputs: torch.Tensor) -> torch.Tensor | int:
    """What the active LoRA adapters of `layer` add to its base output (as PEFT's `lora.Linear.forward` does)."""
    delta: torch.Tensor | int = 0
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        dropout, lora_a, lora_b = layer.lora_dropout[name], layer.lora_A[name], layer.lora_B[name]
        delta = (
            delta + lora_b(lora_a(dropout(layer._cast_input_dtype(inputs, lora_a.weight.dtype)))) * layer.scaling[name]
        )
    return delta


def recompute_adapter_dropout(model: torch.nn.Module) -> None:
    """Make each plain LoRA layer outside the gated MLPs keep its input instead of its dropped-out copy.

    With `lora_dropout > 0`, `lora_A(dropout(x))` keeps `dropout(x)`: one full-width copy (and a mask) per
    adapted layer, where q, k and v would otherwise share `x`. Running dropout and `lora_A` in a checkpoint keeps
    only `x` and recomputes both in the backward with the same mask (the checkpoint restores the RNG state), so
    the result is exactly the same; the recompute is one rank-r matmul. The module tree is left as it is.
    """
    from peft.tuners.lora.layer import LoraLayer

    # Inside the MLPs, `selective` already keeps only each MLP's input.
    in_mlps = {id(m) for mlp in layer_mlps(model) or [] for m in mlp.modules()}
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and id(layer) not in in_mlps and _plain_lora(layer):
            for name in layer.active_adapters:
                dropout = layer.lora_dropout[name] if name in layer.lora_A else None
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    _fuse_dropout(dropout, layer.lora_A[name])


def _fuse_dropout(dropout: torch.nn.Dropout, lora_a: torch.nn.Module) -> None:
    """Run `dropout` inside `lora_a`'s forward, under a checkpoint while training (see above)."""
    apply_dropout, project = dropout.forward, lora_a.forward

    def dropped_projection(x: torch.Tensor) -> torch.Tensor:
        return project(apply_dropout(x))

    dropout.forward = lambda x: x  # PEFT still calls it first; the real dropout now runs in lora_a
    lora_a.forward = _recomputed_in_backward(dropout, dropped_projection)
