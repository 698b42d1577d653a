"""`PredictionWriter`: the completions of `lpeft predict` as one JSON Lines file, in the order of the predict file."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from lightning_peft.atomic import write_text
from lightning_peft.errors import ConfigError

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Write each prompt's completion to a JSON Lines file: one line per row of the predict file, in its order.

    A line is `{"index": row, "prompt": ..., "completion": ...}`, plus `"reference"` when the row holds an answer
    (see `PeftCausalLM.predict_step`). The writer also carries the generation settings: when prediction starts it
    sets them as `pl_module.generation_kwargs`, which `PeftCausalLM.predict_step` passes to `generate`.

    The file is written once, when the predict loop ends, to a temporary file that is then renamed into place, so
    an interrupted run never leaves half a file. With several processes (DDP) every rank's rows are gathered to
    global rank zero (`torch.distributed.all_gather_object`, no shared file system needed), which alone writes the
    file; a row predicted on two ranks is written once. After the run, `predictions` holds the rows (on every rank)
    and `output_path` the file written.

    Args:
        output_file: the JSON Lines file to write; default `<trainer.log_dir>/predictions.jsonl`.
        max_new_tokens: the most tokens generated for each prompt.
        do_sample: sample with `temperature` and `top_p`; false is greedy decoding (deterministic).
        temperature: softmax temperature when sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities sum to this.
    """

    def __init__(
        self,
        output_file: str | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> None:
        super().__init__(write_interval="batch")
        _validate(max_new_tokens, temperature, top_p)
        self.output_file = output_file
        self.generation_kwargs = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_p": top_p,
        }
        self.predictions: list[dict[str, Any]] = []
        self.output_path: Path | None = None

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.predictions = []
        pl_module.generation_kwargs = dict(self.generation_kwargs)

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, list) or not all(isinstance(row, dict) for row in prediction):
            raise TypeError(
                f"PredictionWriter needs predict_step to return a list of dicts, one per row (as "
                f"PeftCausalLM.predict_step does), got {type(prediction).__name__}."
            )
        self.predictions.extend(prediction)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank zero: every rank must ask for it.
        path = Path(self.output_file or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl")
        self.predictions = in_file_order(_gather(trainer, self.predictions))
        if trainer.is_global_zero:
            write_jsonl_atomically(path, self.predictions)
            log.info("Wrote %d predictions to %s", len(self.predictions), path)
        self.output_path = path
        trainer.strategy.barrier("PredictionWriter")


def in_file_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by `index`, each index once; rows without an index follow in the order they came."""
    seen: set[int] = set()
    unique = []
    for row in rows:
        index = row.get("index")
        if index is not None:
            if index in seen:
                continue
            seen.add(index)
        unique.append(row)
    return sorted(unique, key=lambda row: (row.get("index") is None, row.get("index") or 0))


def write_jsonl_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as JSON Lines (UTF-8, one object a line), atomically (`lightning_peft.atomic`)."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _gather(trainer: L.Trainer, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if trainer.world_size <= 1:
        return rows
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def _validate(max_new_tokens: Any, temperature: Any, top_p: Any) -> None:
    problems = []
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        problems.append(f"`max_new_tokens`={max_new_tokens!r} must be an integer of at least 1")
    if not isinstance(temperature, int | float) or not temperature > 0:
        problems.append(f"`temperature`={temperature!r} must be a number above 0")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        problems.append(f"`top_p`={top_p!r} must be a number in (0, 1]")
    if problems:
        raise ConfigError("PredictionWriter: " + "; ".join(problems) + ".")
