"""`RunSummary`: what a training run did, in `<run folder>/run_summary.json` (read by `lpeft publish` for the card)."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from typing import Any

import lightning.pytorch as L
import torch
from typing_extensions import override

from lightning_peft.atomic import write_text
from lightning_peft.run_files import SUMMARY_FILE
from lightning_peft.run_folder import discard_if_unused, run_dir

log = logging.getLogger(__name__)


class RunSummary(L.Callback):
    """Count optimizer steps, tokens and wall time of `fit`, and write them as JSON when it ends.

    `tokens` counts the non-padding tokens the model trained on and `supervised_tokens` those that carried
    loss, summed over all processes. The counts are part of the checkpoint: a run resumed with `ckpt_path`
    reports the whole run (every part's tokens and training time), not only its last part. `data` lists the data
    module's sources with their roles (`SFTDataModule.data_sources`: Hub ids with subset/split/revision, local
    files by name only). `lpeft fit` adds this callback by default.

    Args:
        filename: Name of the JSON file written in the run folder (see `lightning_peft.run_folder`).
    """

    def __init__(self, filename: str = SUMMARY_FILE) -> None:
        self.filename = filename
        self._start = 0.0
        # Running sums, kept as tensors on the batch's device: reading them each step would stall a GPU.
        self._tokens: torch.Tensor | int = 0
        self._supervised: torch.Tensor | int = 0
        # What the earlier parts of a resumed run counted, all processes together.
        self._earlier = {"tokens": 0, "supervised_tokens": 0, "duration_s": 0.0}
        self._strategy: Any = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._strategy = trainer.strategy
        self._earlier = dict.fromkeys(self._earlier, 0)  # a resume restores them after `setup`

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._tokens = self._supervised = 0

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mask = batch.get("attention_mask")
        # Packed rows have no mask; their padding is labelled -100 like prompts, so count every position.
        self._tokens = self._tokens + (mask.sum() if mask is not None else batch["input_ids"].numel())
        self._supervised = self._supervised + (batch["labels"][:, 1:] != -100).sum()

    @override
    def state_dict(self) -> dict[str, Any]:
        # Called on every process while a checkpoint is taken, so the sum over processes can be taken here.
        return self._totals()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._earlier = {key: state_dict.get(key, 0) for key in self._earlier}

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = self._totals()
        path = run_dir(trainer) / self.filename  # every process: the first call is a collective
        if not trainer.is_global_zero:
            return
        summary = {
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            **totals,
            "hardware": hardware_description(trainer),
            # The data sets behind the adapter, as parsed here (where local paths resolve), for the model card.
            "data": getattr(trainer.datamodule, "data_sources", None),
        }
        write_text(path, json.dumps(summary, indent=2) + "\n")
        log.info("Run summary written to %s", path)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for folder in discard_if_unused(trainer):  # a run that failed before training leaves no empty run folder
            log.info("Removed %s: the run failed before its first step", folder)

    def _totals(self) -> dict[str, Any]:
        """Tokens (summed over processes) and training time of the whole run so far; a collective."""
        device = torch.device("cpu") if self._strategy is None else self._strategy.root_device
        counts = torch.stack(
            [torch.as_tensor(n, dtype=torch.float64, device=device) for n in (self._tokens, self._supervised)]
        )
        if self._strategy is not None:
            counts = self._strategy.reduce(counts, reduce_op="sum")
        return {
            "tokens": self._earlier["tokens"] + int(counts[0]),
            "supervised_tokens": self._earlier["supervised_tokens"] + int(counts[1]),
            "duration_s": round(self._earlier["duration_s"] + time.monotonic() - self._start, 3),
        }


def hardware_description(trainer: L.Trainer) -> str:
    """E.g. "2 x NVIDIA H200" or "CPU x86_64, 2 cores"; one process's view times the number of processes."""
    if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
        return f"{trainer.world_size} x {torch.cuda.get_device_name(trainer.strategy.root_device)}"
    cores = os.cpu_count() or 1
    nodes = f"{trainer.num_nodes} nodes, " if trainer.num_nodes > 1 else ""
    return f"{nodes}CPU {platform.machine()}, {cores} cores"
