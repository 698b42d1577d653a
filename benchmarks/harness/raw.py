"""System (a): a hand-written PyTorch + PEFT loop over the prepared batches, the overhead floor.

No data loader, no logging, no callbacks: each step moves a ready batch to the device, runs forward, the mean
next-token cross-entropy over the supervised tokens, backward and the optimizer step. Anything a framework adds
on top of this is its overhead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from benchmarks.harness.common import autocast, load_plan, peft_model
from benchmarks.harness.recorder import IGNORE_INDEX, StepRecorder


def run(spec: dict[str, Any], recorder: StepRecorder) -> dict[str, Any]:
    torch.manual_seed(spec["seed"])
    model = peft_model(spec)
    batches = load_plan(spec)["packed" if spec["packing"] else "padded"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, len(batches))
    recorder.total_steps = len(batches)
    for batch in batches:
        batch = {k: v.to(spec["device"], non_blocking=True) for k, v in batch.items()}
        loss = next_token_loss(model, batch, spec)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recorder.add(batch, loss)
        recorder.end_step()
    return {}


def next_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy of each next token over the supervised ones.

    The labels are shifted rather than the logits (as transformers' own loss does): slicing the logits would copy
    all of them, 200 MB and ~0.2 s per step for SmolLM2 at 4 x 256 on a CPU. The logits are released on return
    (the backward needs only what autograd saved), so they never outlive their step.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with autocast(spec):
        logits = model(**inputs, use_cache=False).logits
    return shifted_cross_entropy(logits, batch["labels"])


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` at each position against the next label, over the supervised ones."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
