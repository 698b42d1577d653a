"""The side by side view of harness results: one row per task and metric, one column per model (base, adapters).

Pure functions over the harness's result dicts: no torch, no harness import.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
_NOT_METRICS = {"alias", "name", "sample_len", "samples", " ", ""}


@dataclass(frozen=True)
class MetricRow:
    """One task's metric (after one filter) for every model: label → (value, stderr or None)."""

    task: str
    metric: str
    filter: str
    higher_is_better: bool | None
    values: dict[str, tuple[float, float | None]]

    @property
    def name(self) -> str:
        """The metric as the table shows it: `acc ↑`, `exact_match (strict-match) ↑`."""
        shown = self.metric if self.filter == "none" else f"{self.metric} ({self.filter})"
        arrow = {True: " ↑", False: " ↓"}.get(self.higher_is_better, "")  # type: ignore[arg-type]
        return shown + arrow


def metric_rows(results: dict[str, dict[str, Any]]) -> list[MetricRow]:
    """Rows for every (task, metric, filter) any model has, in the order the harness reports them.

    Args:
        results: label → the dict `lightning_peft.evaluation.evaluate` returned for that model.
    """
    rows: dict[tuple[str, str, str], MetricRow] = {}
    for label, run in results.items():
        for task, metrics in run["results"].items():
            better = run.get("higher_is_better", {}).get(task, {})
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if metric in _NOT_METRICS or metric.endswith("_stderr") or not _is_number(value):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                row = rows.setdefault(
                    (task, metric, filter_name),
                    MetricRow(task, metric, filter_name or "none", better.get(metric), {}),
                )
                row.values[label] = (float(value), float(stderr) if _is_number(stderr) else None)
    return list(rows.values())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_table(rows: list[MetricRow], labels: list[str]) -> str:
    """A plain-text table: task, metric, then `value ± stderr` for each label (— where a model has no value)."""
    header = ["task", "metric", *labels]
    body = [[row.task, row.name, *(_cell(row.values.get(label)) for label in labels)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]  # fmt: skip
    return "\n".join(lines)


def _cell(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "—"
    mean, stderr = value
    return f"{mean:.4f}" if stderr is None else f"{mean:.4f} ± {stderr:.4f}"


def results_payload(
    model: str, results: dict[str, dict[str, Any]], sources: dict[str, str | None], settings: dict[str, Any]
) -> dict[str, Any]:
    """What `lpeft eval --output` writes: the settings, the side by side rows, and each model's harness results.

    Args:
        model: The base model as given.
        results: label → the harness's results for that model.
        sources: label → the adapter's folder or reference (None for the base).
        settings: The run's options (tasks, limit, num_fewshot, batch_size, chat, quantization).
    """
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    return {
        "model": model,
        "settings": settings,
        "lm_eval_version": next((r.get("lm_eval_version") for r in results.values()), None),
        "table": [
            {
                "task": row.task,
                "metric": row.metric,
                "filter": row.filter,
                "higher_is_better": row.higher_is_better,
                "values": {label: {"value": v, "stderr": s} for label, (v, s) in row.values.items()},
            }
            for row in metric_rows(results)
        ],
        "models": {
            label: {"adapter": sources.get(label), **{k: run[k] for k in keep if k in run}}
            for label, run in results.items()
        },
    }


def before_after(before: dict[str, Any] | None, after: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per task and metric: the base's and the adapter's value, and the task's data set (from the
    harness's task config), as `LmEvalCallback` writes them to `lm_eval.json` for `lpeft publish`."""
    results = {"adapter": after} if before is None else {"base": before, "adapter": after}
    records = []
    for row in metric_rows(results):
        config = after.get("configs", {}).get(row.task, {})
        records.append(
            {
                "task": row.task,
                "metric": row.metric,
                "filter": row.filter,
                "higher_is_better": row.higher_is_better,
                "base": row.values["base"][0] if "base" in row.values else None,
                "adapter": row.values["adapter"][0] if "adapter" in row.values else None,
                "dataset": config.get("dataset_path"),
                "dataset_config": config.get("dataset_name"),
                "split": config.get("test_split") or config.get("validation_split"),
            }
        )
    return records


def write_results(folder: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as `folder/results.json`, atomically (a reader sees the old file or the whole new one)."""
    from lightning_peft.atomic import write_text

    return write_text(Path(folder) / RESULTS_FILE, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    """Task configs hold functions (`!function` in the YAML) and numpy numbers: keep what JSON can say."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return getattr(value, "__qualname__", None) or str(value)
