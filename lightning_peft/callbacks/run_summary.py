"""`RunSummary`: what a training run did, in `<log_dir>/run_summary.json` (read by `lpeft publish` for the card)."""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from typing_extensions import override

log = logging.getLogger(__name__)
SUMMARY_FILE = "run_summary.json"


class RunSummary(L.Callback):
    """Count optimizer steps, tokens and wall time of `fit`, and write them as JSON when it ends.

    `tokens` counts the non-padding tokens the model trained on and `supervised_tokens` those that carried
    loss, summed over all processes. `lpeft fit` adds this callback by default.

    Args:
        filename: Name of the JSON file written in `trainer.log_dir`.
    """

    def __init__(self, filename: str = SUMMARY_FILE) -> None:
        self.filename = filename
        self._start = 0.0
        # Running sums, kept as tensors on the batch's device: reading them each step would stall a GPU.
        self._tokens: torch.Tensor | int = 0
        self._supervised: torch.Tensor | int = 0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mask = batch.get("attention_mask")
        # Packed rows have no mask; their padding is labelled -100 like prompts, so count every position.
        self._tokens = self._tokens + (mask.sum() if mask is not None else batch["input_ids"].numel())
        self._supervised = self._supervised + (batch["labels"][:, 1:] != -100).sum()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = torch.stack(
            [torch.as_tensor(n, dtype=torch.float64, device=pl_module.device) for n in (self._tokens, self._supervised)]
        )
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        # trainer.log_dir broadcasts from rank zero: every process must ask for it.
        path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
        if not trainer.is_global_zero:
            return
        summary = {
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "tokens": int(counts[0]),
            "supervised_tokens": int(counts[1]),
            "duration_s": round(time.monotonic() - self._start, 3),
            "hardware": hardware_description(trainer),
        }
        _write_json(path, summary)
        log.info("Run summary written to %s", path)


def hardware_description(trainer: L.Trainer) -> str:
    """E.g. "2 x NVIDIA H200" or "CPU x86_64, 2 cores"; one process's view times the number of processes."""
    if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
        return f"{trainer.world_size} x {torch.cuda.get_device_name(trainer.strategy.root_device)}"
    cores = os.cpu_count() or 1
    nodes = f"{trainer.num_nodes} nodes, " if trainer.num_nodes > 1 else ""
    return f"{nodes}CPU {platform.machine()}, {cores} cores"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(handle.name, path)
