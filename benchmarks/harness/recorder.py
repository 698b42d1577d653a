"""`StepRecorder`: what every system reports, measured the same way in each of them.

Each system calls `add(batch, loss)` once per optimizer step and `end_step()` right after the optimizer step is
done. Nothing is read back from the device while training (losses and batches are kept as tensors), so the
recorder adds no synchronization of its own, except on a GPU at the three steps that bound the timings.
Counts are taken from the batches the system really trained on, after training:

- active tokens: supervised targets (labels after the shift that are not -100), what fine-tuning learns from;
- real tokens: tokens of the examples (padding excluded), the unit of the FLOP count;
- processed tokens: every position the model computed, padding included.
"""

from __future__ import annotations

import itertools
import resource
import time
from typing import Any

import torch

IGNORE_INDEX = -100
KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


class StepRecorder:
    """Per-step losses, batches and end times of one training run.

    Args:
        t0: the wall-clock time (`time.time()`) at which the orchestrator started this process.
        warmup: steps left out of the throughput window, at least 1 (the window starts when step `warmup` - 1
            ends).
        cuda: synchronize the GPU before reading the clock at the first, the last warm-up and the last step.
    """

    def __init__(self, t0: float, warmup: int, cuda: bool = False) -> None:
        self.t0, self.warmup, self.cuda = t0, warmup, cuda
        self.total_steps: int | None = None
        self.batches: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.first_step_wall: float | None = None

    def add(self, batch: dict[str, Any], loss: torch.Tensor) -> None:
        """Keep the step's batch (by reference) and its loss (detached, still on the device)."""
        self.batches.append({k: batch[k] for k in KEYS if batch.get(k) is not None})
        self.losses.append(loss.detach())

    def end_step(self) -> None:
        """Mark the end of an optimizer step."""
        step = len(self.ends)
        if self.cuda and step in (0, self.warmup - 1, (self.total_steps or 0) - 1):
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if step == 0:
            self.first_step_wall = time.time()

    def result(self) -> dict[str, Any]:
        """Everything measured, as JSON-ready numbers (reads the losses and batches back to the host)."""
        if len(self.ends) <= self.warmup:
            raise RuntimeError(f"only {len(self.ends)} steps ran; the throughput window needs more than {self.warmup}")
        counts = [batch_counts({k: v.cpu() for k, v in batch.items()}) for batch in self.batches]
        first = self.warmup - 1
        return {
            "steps": len(self.ends),
            "warmup_steps": self.warmup,
            "losses": [float(loss) for loss in self.losses],
            "window_s": self.ends[-1] - self.ends[first],
            # CPU time of this process over the window: on a shared machine, a check of the wall-clock figures.
            "window_cpu_s": self.cpu_ends[-1] - self.cpu_ends[first],
            # Each step's duration (meaningful on CPUs only: a GPU is synchronized at the window's ends alone).
            "step_s": [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)],
            "time_to_first_step_s": (self.first_step_wall or 0.0) - self.t0,
            "per_step": {key: [c[key] for c in counts] for key in counts[0]},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None,
        }


def batch_counts(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Active, real and processed tokens of one batch, and the sum of L*(L+1)/2 over its examples (attention)."""
    lengths = example_lengths(batch)
    return {
        "active": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "real": sum(lengths),
        "processed": batch["input_ids"].numel(),
        "attention_pairs": sum(n * (n + 1) // 2 for n in lengths),
    }


def example_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """The length of every example in the batch.

    Padded batches hold one example per row (its attention mask). Packed rows (position_ids, no mask) hold one
    example per run of positions starting at 0; a run without any supervised label is padding (every real example
    keeps at least one), as lightning-peft pads its packed rows and TRL never does.
    """
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(1)]
    lengths = []
    for positions, labels in zip(batch["position_ids"], batch["labels"], strict=True):
        starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
        for start, end in itertools.pairwise(starts):
            if (labels[start:end] != IGNORE_INDEX).any():
                lengths.append(end - start)
    return lengths
