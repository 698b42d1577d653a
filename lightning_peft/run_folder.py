"""The run folder: where one training run's files go, whichever Lightning loggers are configured.

The rule, in one place: a run's folder is

- the `log_dir` of the first `CSVLogger` or `TensorBoardLogger` in `trainer.loggers` (Lightning's own
  `<save_dir>/<name>/version_N`), so that their `metrics.csv`, `hparams.yaml` and event files sit beside the
  adapter; or else
- `<default_root_dir>/lightning_logs/version_N`, N the next free number, claimed by creating the folder (two runs
  started at once never share one), for W&B, MLflow, any other logger, or none.

The final adapter, `run_summary.json`, `metrics.jsonl`, `config.yaml`, AdapterCheckpoint's default `checkpoints/`
and AdapterMerge's default `merged/` all go there. A resumed run (`ckpt_path`) gets a new folder like any other run;
RunSummary and MetricHistory carry the counts and metrics of the earlier parts over through the checkpoint, so the
newest folder describes the whole run. `trainer.log_dir` is not used: with W&B or MLflow first it is the logger's
`save_dir`, shared by every run.

A run that fails before its first optimizer step (a data or config error found while setting up) leaves no folder:
Lightning creates the loggers' folders before any setup hook runs, and `discard_if_unused` removes them again
when they hold only what the loggers and the config writer put there (`RunSummary` calls it on an exception), so
the next run does not become `version_1` next to an empty `version_0`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from weakref import WeakKeyDictionary

import lightning.pytorch as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

DEFAULT_NAME = "lightning_logs"
# What loggers and LightningCLI write into a run folder before the first step; a folder with nothing else is unused.
_BOOTSTRAP_FILES = re.compile(r"events\.out\.tfevents\..*|hparams\.yaml|metrics\.csv|config\.yaml")
_VERSION = re.compile(r"version_(\d+)")
# One folder per Trainer: resolved once (a collective), then every hook of every process reads the same path.
_RUN_DIRS: WeakKeyDictionary[L.Trainer, Path] = WeakKeyDictionary()


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of the run `trainer` is doing, created.

    The first call for a trainer is a collective under DDP (rank zero decides, then broadcasts): every process must
    make it, from a hook that runs on every process after the strategy is set up (`setup` or later).
    """
    cached = _RUN_DIRS.get(trainer)
    if cached is not None:
        return cached
    path = str(_claim(trainer)) if trainer.is_global_zero else None
    path = trainer.strategy.broadcast(path)
    if path is None:
        raise RuntimeError("run_dir() was called before the processes were connected: call it from `setup` or later.")
    cached = _RUN_DIRS[trainer] = Path(path)
    return cached


def runs_root(trainer: L.Trainer) -> Path:
    """The folder holding every run folder of these settings (where `ckpt_path="last"` looks); no collective."""
    logger = versioned_logger(trainer)
    if logger is not None:
        return Path(logger.root_dir)
    return Path(trainer.default_root_dir) / DEFAULT_NAME


def versioned_logger(trainer: L.Trainer) -> CSVLogger | TensorBoardLogger | None:
    """The first logger that keeps its own `version_N` folder on the local disk, if any."""
    return next((lg for lg in trainer.loggers if isinstance(lg, (CSVLogger, TensorBoardLogger))), None)


def logger_fields(folder: Path) -> tuple[str, str, int | str]:
    """(save_dir, name, version) that make Lightning's `<save_dir>/<name>/version_<version>` rule give `folder`."""
    match = _VERSION.fullmatch(folder.name)
    return str(folder.parent.parent), folder.parent.name, int(match[1]) if match else folder.name


def _claim(trainer: L.Trainer) -> Path:
    logger = versioned_logger(trainer)
    if logger is not None:
        path = Path(logger.log_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = runs_root(trainer)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        path = root / f"version_{_next_version(root)}"
        try:
            path.mkdir()
        except FileExistsError:  # another run took it in the meantime
            continue
        return path


def share_version(trainer: L.Trainer) -> None:
    """Give the first CSV/TensorBoard logger's version to the others under the same root that have none yet.

    Lightning creates every logger's folder before any callback runs, each taking the next free number: the
    default CSV + TensorBoard pair would split one run over `version_0` and `version_1`. Call it right after the
    Trainer is built (`lpeft` does).
    """
    first = versioned_logger(trainer)
    if first is None:
        return
    for other in trainer.loggers:
        same_root = isinstance(other, (CSVLogger, TensorBoardLogger)) and other.root_dir == first.root_dir
        if same_root and other is not first and other._version is None:
            other._version = first.version


def _next_version(root: Path) -> int:
    numbers = [int(m[1]) for p in root.iterdir() if p.is_dir() and (m := _VERSION.fullmatch(p.name))]
    return max(numbers, default=-1) + 1


def discard_if_unused(trainer: L.Trainer) -> list[Path]:
    """Remove this run's folders if the run failed before its first step and they hold only logger/config files.

    Call it on rank zero from `on_exception`. Folders of a run that trained, resumed from a checkpoint, or holds
    anything else (an adapter, checkpoints, files a user put there) are kept. Returns the folders removed.
    """
    if trainer.global_step > 0 or not trainer.is_global_zero:
        return []
    candidates = {Path(lg.log_dir) for lg in trainer.loggers if isinstance(lg, (CSVLogger, TensorBoardLogger))}
    if trainer in _RUN_DIRS:
        candidates.add(_RUN_DIRS[trainer])
    removed = []
    for folder in sorted(candidates):
        entries = list(folder.iterdir()) if folder.is_dir() else None
        if entries is not None and all(e.is_file() and _BOOTSTRAP_FILES.fullmatch(e.name) for e in entries):
            shutil.rmtree(folder)
            removed.append(folder)
    return removed
