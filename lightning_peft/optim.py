"""Optimizers (torch AdamW, bitsandbytes 8-bit and paged AdamW) and warmup schedules for the trainable parameters."""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.errors import ConfigError, require


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no decay on vectors (biases, norms), as in every reference recipe."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("The model has no trainable parameter: check `model.adapter` (target_modules, layers).")
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(
    name: str, model: torch.nn.Module, learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate)
    require("bitsandbytes", purpose=f"`optimizer: {name}`")
    import bitsandbytes as bnb

    classes = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }
    if name not in classes:
        raise ConfigError(f"`optimizer`={name!r} is not one of adamw, {', '.join(classes)}.")
    return classes[name](groups, lr=learning_rate)


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine / linear decay to zero or a constant rate (transformers' schedules)."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    raise ConfigError(f"`lr_scheduler`={name!r} is not one of cosine, linear, constant.")
