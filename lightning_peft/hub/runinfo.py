"""What a training run recorded about itself: logged metrics, hyperparameters and an optional summary.

`lpeft fit` saves the adapter to `<run folder>/adapter/` (see `lightning_peft.run_folder`); the run's files sit
next to it:
- `metrics.jsonl`, written by the `MetricHistory` callback whatever the loggers (one JSON object per logging call:
  `{"step": 9, "train_loss": 1.93, ...}`): the loss curve, the final losses and the evaluation metrics (`val_*`,
  `test_*`) come from here. Runs made before it existed have only `metrics.csv` (Lightning's `CSVLogger`), which
  is read the same way when `metrics.jsonl` is absent. TensorBoard, W&B and MLflow files are not read.
- `hparams.yaml` (the module's and data module's hyperparameters, from CSV/TensorBoard loggers) and `config.yaml`
  (LightningCLI's full run).
- `run_summary.json`, optional: `{"steps": int, "tokens": int, "duration_s": float, "hardware": str, "data":
  [...]}` for what Lightning does not log. `data` (see `SFTDataModule.data_sources`) says which sources were Hub
  data sets, as resolved when the run started; without it, the data settings in the YAML files give local file
  names only (whether `org/name` was a local folder or a Hub id cannot be told afterwards, elsewhere).
Whatever is missing is recorded as unknown, never guessed.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.errors import CorruptFileError, DataError
from lightning_peft.files import read_json
from lightning_peft.run_files import (
    CSV_METRICS_FILE,
    HISTORY_FILE,
    HPARAMS_FILE,
    LM_EVAL_FILE,
    RUN_YAML_FILES,
    SUMMARY_FILE,
    read_history,
    read_run_yaml,
)

_HPARAM_KEYS = (
    "learning_rate",
    "weight_decay",
    "optimizer",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "quantization",
    "gradient_checkpointing",
    "batch_size",
    "max_length",
    "packing",
    "format",
    "train_on_prompt",
    "seed",
)
_TRAINER_KEYS = ("max_steps", "max_epochs", "precision", "accumulate_grad_batches", "gradient_clip_val")
_DATA_ROLES = {"train_file": "train", "val_file": "validation", "test_file": "test"}
_SUMMARY_KEYS = ("steps", "tokens", "duration_s", "hardware")
# A damaged run file only feeds the model card: publishing goes on without it, or with another run's files.
RUN_FILE_FIX = "delete it (the card then leaves out what it records) or pass --run-dir"
_RECORD_KEYS = (*_SUMMARY_KEYS, "final_train_loss", "final_val_loss")


@dataclass
class RunRecord:
    """The training run behind an adapter, as far as its files tell.

    Attributes:
        run_dir: The folder read, or None when no run files were found.
        train_loss: (step, value) points of `train_loss`.
        val_loss: (step, value) points of `val_loss`.
        summary: steps, tokens, duration_s, hardware, final_train_loss, final_val_loss (None when unknown).
        evaluation: The last value of every `val_*` / `test_*` metric.
        hyperparameters: Optimizer, schedule, batch and trainer settings found in hparams.yaml / config.yaml.
        data_files: Names of the local data files by role: train, validation, test (", "-joined for a mixture).
        hub_sources: The Hub data sets by role: {role, id, subset, split, revision}.
        harness: lm-evaluation-harness scores from `lm_eval.json` (LmEvalCallback): one record per task and metric
            with the base's and the adapter's value and the task's data set.
        sources: The files the record was read from.
    """

    run_dir: Path | None = None
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(_RECORD_KEYS))
    evaluation: dict[str, float] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data_files: dict[str, str] = field(default_factory=dict)
    hub_sources: list[dict[str, Any]] = field(default_factory=list)
    harness: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def find_run_dir(adapter_dir: Path, run_dir: str | Path | None = None) -> Path | None:
    """The run folder: `run_dir` when given, else the adapter's parent when it holds run files."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise DataError(f"`--run-dir` {run_dir} is not a folder.")
        return run_dir
    parent = adapter_dir.resolve().parent
    if any(
        (parent / name).is_file() for name in (HISTORY_FILE, CSV_METRICS_FILE, HPARAMS_FILE, SUMMARY_FILE, LM_EVAL_FILE)
    ):
        return parent
    return None


def read_run(adapter_dir: Path, run_dir: str | Path | None = None) -> RunRecord:
    """Everything the run's files say (an empty record when there are none)."""
    folder = find_run_dir(adapter_dir, run_dir)
    record = RunRecord(run_dir=folder)
    if folder is None:
        return record
    if (folder / HISTORY_FILE).is_file():
        _read_metrics(read_history(folder / HISTORY_FILE), record, HISTORY_FILE)
    elif (folder / CSV_METRICS_FILE).is_file():
        _read_metrics(_csv_rows(folder / CSV_METRICS_FILE), record, CSV_METRICS_FILE)
    for name in RUN_YAML_FILES:
        if (folder / name).is_file():
            _read_hparams(folder / name, record)
    if (folder / SUMMARY_FILE).is_file():
        _read_summary(folder / SUMMARY_FILE, record)
    if (folder / LM_EVAL_FILE).is_file():
        _read_harness(folder / LM_EVAL_FILE, record)
    return record


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a readable CSV file: {err}") from err


def _read_metrics(rows: list[dict[str, Any]], record: RunRecord, source: str) -> None:
    record.sources.append(source)
    steps = []
    for row in rows:
        step = _number(row.get("step"))
        if step is not None:
            steps.append(int(step))
        for name, value in row.items():
            value = _number(value)
            if value is None or name in ("step", "epoch") or name is None:
                continue
            if name == "train_loss" and step is not None:
                record.train_loss.append((int(step), value))
            elif name == "val_loss" and step is not None:
                record.val_loss.append((int(step), value))
            if name.startswith(("val_", "test_")):
                record.evaluation[name] = value
    if record.train_loss:
        record.summary["final_train_loss"] = record.train_loss[-1][1]
    if record.val_loss:
        record.summary["final_val_loss"] = record.val_loss[-1][1]
    if steps:
        record.summary["steps"] = max(steps) + 1  # Lightning logs the 0-based global step


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return float(f"{value:.6g}") if math.isfinite(value) else None


def _read_hparams(path: Path, record: RunRecord) -> None:
    data = read_run_yaml(path)
    if not isinstance(data, dict):
        return
    record.sources.append(path.name)
    sections = [
        data,
        *(data.get(k, {}).get("init_args", {}) for k in ("model", "data") if isinstance(data.get(k), dict)),
    ]
    for section in sections:
        for key in _HPARAM_KEYS:
            if _is_scalar(section.get(key)):
                record.hyperparameters.setdefault(key, section[key])
        for key, role in _DATA_ROLES.items():
            if isinstance(section.get(key), str) and section[key]:
                record.data_files.setdefault(role, Path(section[key]).name)
    trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else {}
    for key in _TRAINER_KEYS:
        if _is_scalar(trainer.get(key)):
            record.hyperparameters.setdefault(key, trainer[key])


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) and value != ""


def _read_summary(path: Path, record: RunRecord) -> None:
    data = read_json(path, fix=RUN_FILE_FIX)
    if not isinstance(data, dict):
        raise CorruptFileError(
            f"{path} is damaged (it must hold a JSON object with {', '.join(_SUMMARY_KEYS)}): {RUN_FILE_FIX}."
        )
    record.sources.append(SUMMARY_FILE)
    for key in _SUMMARY_KEYS:
        if data.get(key) is not None:
            record.summary[key] = data[key]
    if isinstance(data.get("data"), list):
        _read_data_sources(data["data"], path, record)


def _read_harness(path: Path, record: RunRecord) -> None:
    data = read_json(path, fix=RUN_FILE_FIX)
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and {"task", "metric"} <= t.keys() for t in tasks):
        raise CorruptFileError(
            f'{path} is damaged (it must hold {{"tasks": [{{task, metric, ...}}]}}): {RUN_FILE_FIX}.'
        )
    record.sources.append(LM_EVAL_FILE)
    record.harness = tasks


def _read_data_sources(entries: list[Any], path: Path, record: RunRecord) -> None:
    """The run's own account of its data (`run_summary.json`'s `data`) replaces what the YAML settings suggest."""
    files: dict[str, list[str]] = {}
    hub = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("role") not in _DATA_ROLES.values():
            raise DataError(f"{path}: `data` entry {entry!r} is not a data source with a train/validation/test role.")
        if entry.get("hub"):
            hub.append({key: entry.get(key) for key in ("role", "id", "subset", "split", "revision")})
        else:
            files.setdefault(entry["role"], []).append(str(entry.get("name")))
    record.data_files = {role: ", ".join(names) for role, names in files.items()}
    record.hub_sources = hub
