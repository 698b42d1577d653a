"""`compile: true`: torch.compile of each decoder layer (regional compilation), LoRA included.

A transformers decoder is one layer class repeated: compiling each layer instance with the same code compiles
once and reuses the graph for every layer (parameters are graph inputs), which is what PyTorch recommends for
transformers ("regional compilation") instead of compiling the whole model: the embedding, the loss and the
Python around them stay eager, and the compile takes seconds instead of minutes.

Shapes change every step (packed rows hold other documents, padded batches another longest row), so the layers
are compiled with `dynamic=True`: one graph for every sequence length instead of a recompile per shape.
Per-document packed attention (`lightning_peft.packed_attention`) stays out of the graph: it decides
data-dependent things (the documents' lengths and their grouping) that would make every batch a new graph, and
its work is already fused SDPA kernels. The graph holds what compile can fuse around it: norms, rotary
embeddings, projections with their LoRA branches, the MLP's activation and product.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from lightning_peft.errors import ConfigError

log = logging.getLogger(__name__)

#: Graphs dynamo may build per function of a layer. Training alone needs several: the first layer's input does not
#: require grad and the others' do, padded batches carry a mask and packed ones do not, and the attention call
#: splits a layer in two. Past the limit dynamo would silently run the layer eager for good.
RECOMPILE_LIMIT = 32
#: The values `compile` accepts, for messages.
CHOICES = "false or true"


def setting_problem(value: Any) -> str | None:
    """What is wrong with a `compile` value, or None when it is a boolean."""
    if isinstance(value, bool):
        return None
    return f"`compile`={value!r} is not allowed; use {CHOICES}"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' `GradientCheckpointingLayer`s)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Replace each decoder layer's forward with its compiled version (in place); return how many layers.

    Raises:
        ConfigError: the model has no decoder layers transformers marks as such (nothing to compile), or they are
            checkpointed whole, which dynamo does not trace into (the layers would silently run eager).
    """
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"`compile: true` compiles the decoder layers, and {type(model).__name__} has none that transformers "
            "marks (GradientCheckpointingLayer); set `model.compile: false`."
        )
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ConfigError(
            f"`compile: true` would run the decoder layers of {type(model).__name__} uncompiled: each is "
            "checkpointed whole (`gradient_checkpointing: selective` falls back to that on layers without an `mlp` "
            "module); set `model.gradient_checkpointing: false`, or `model.compile: false`."
        )
    for layer in layers:
        layer.forward = _compiled_while_training(layer.forward)
    log.info("`compile`: compiling %d decoder layers (one graph, dynamic shapes)", len(layers))
    return len(layers)


def _compiled_while_training(forward: Any) -> Any:
    """`forward` compiled where gradients are recorded (training), eager elsewhere.

    Evaluation, generation and the no-grad probes (`losses.chunking_blocker`, the packing isolation check) would
    each need graphs of their own, and dynamo caps the graphs per function (`recompile_limit`, 8) before it falls
    back to eager for good; they also gain little, running once or without a backward.
    """
    compiled = torch.compile(forward, dynamic=True)

    @functools.wraps(forward)
    def forward_compiled_in_training(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    return forward_compiled_in_training
