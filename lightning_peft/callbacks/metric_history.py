"""`MetricHistory`: every logged metric of a run in `<run folder>/metrics.jsonl`, whichever loggers are configured.

`lpeft publish` draws the card's loss curve and reads its final and evaluation metrics from this file, so it must
not depend on the user's choice of loggers (W&B and MLflow keep their metrics off the run folder, and
`logger: false` keeps none). The callback adds a small Lightning `Logger` of its own to `trainer.loggers`: it then
receives exactly what the other loggers receive (the module's `self.log` values, LearningRateMonitor's rates), at
the same steps, and nothing changes for them.

One JSON object per line, `{"step": 9, "epoch": 0, "train_loss": 1.93}`. The file is first written atomically
(with the rows of the earlier parts of a resumed run), then each logging call appends one line: a crash can cut
only the last line short, and readers skip such a line. The rows are part of the checkpoint, so a run resumed with
`ckpt_path` writes its whole history, earlier parts included, into its own folder.
"""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_peft.atomic import append_line, write_text
from lightning_peft.run_files import HISTORY_FILE, read_history
from lightning_peft.run_folder import logger_fields, run_dir


class MetricHistory(L.Callback):
    """Record every logged metric of `fit` as JSON Lines in the run folder (rank zero only); resumable.

    `lpeft fit` adds this callback by default.

    Args:
        filename: Name of the JSON Lines file written in the run folder (see `lightning_peft.run_folder`).
    """

    def __init__(self, filename: str = HISTORY_FILE) -> None:
        self.filename = filename
        self.rows: list[dict[str, Any]] = []
        self.path: Path | None = None
        self._logger: _HistoryLogger | None = None
        self._started = False  # whether the file holds `rows` and takes appends

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        folder = run_dir(trainer)  # every process: the first call is a collective
        self.path = folder / self.filename
        self.rows = []  # one history per run; a resume restores the earlier rows after `setup`
        if self._logger not in trainer.loggers:
            # Last, so that `trainer.logger` and `trainer.log_dir` stay those of the user's loggers.
            self._logger = _HistoryLogger(self, folder)
            trainer.loggers = [*trainer.loggers, self._logger]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once a resume has restored the earlier rows and the loops (FSDP restores after `on_fit_start`).
        if trainer.is_global_zero and self.path is not None:
            self.rows += _logged_after_the_checkpoint(trainer, self.rows, self.filename)
            write_text(self.path, "".join(_line(row) for row in self.rows))
            self._started = True

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._started = False
        if self._logger in trainer.loggers:
            trainer.loggers = [lg for lg in trainer.loggers if lg is not self._logger]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict.get("rows", [])]

    def record(self, metrics: dict[str, Any], step: int | None) -> None:
        """Keep one logging call's metrics and append them to the file."""
        row: dict[str, Any] = {"step": step}
        row.update({name: _scalar(value) for name, value in metrics.items()})
        self.rows.append(row)
        if self._started and self.path is not None:
            append_line(self.path, _line(row).rstrip("\n"))


class _HistoryLogger(Logger):
    """Forwards what Lightning logs to its `MetricHistory`.

    Its save_dir, name and version describe the run folder, so that when it is the only logger (`logger: false`),
    Lightning's defaults (a `ModelCheckpoint`'s dirpath, the progress bar's version) point at that folder too.
    """

    def __init__(self, history: MetricHistory, folder: Path) -> None:
        super().__init__()
        self._history = history
        self._save_dir, self._name, self._version = logger_fields(folder)

    @property
    @override
    def name(self) -> str:
        return self._name

    @property
    @override
    def version(self) -> int | str:
        return self._version

    @property
    @override
    def save_dir(self) -> str:
        return self._save_dir

    @override
    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are in the run folder's config.yaml already."""

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._history.record(metrics, step)


def _logged_after_the_checkpoint(trainer: L.Trainer, rows: list[dict[str, Any]], filename: str) -> list[dict[str, Any]]:
    """Rows the earlier part of a resumed run logged after its checkpoint was taken, for steps before it.

    Lightning logs an epoch's metrics after the epoch's checkpoint, and the resumed run does not redo them: take
    them from the earlier part's own file (`<its run folder>/checkpoints/<checkpoint>`), provided that file starts
    with the checkpoint's rows. Rows at or after the checkpoint's step are left out: the resumed run logs them again.
    """
    if not trainer.ckpt_path or not rows:
        return []
    earlier = Path(trainer.ckpt_path).parent.parent / filename
    if not earlier.is_file():
        return []
    written = read_history(earlier)
    if written[: len(rows)] != rows:
        return []
    return [
        row for row in written[len(rows) :] if isinstance(row.get("step"), int) and row["step"] < trainer.global_step
    ]


def _scalar(value: Any) -> float | int | None:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bool | int):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN or infinity


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":")) + "\n"
