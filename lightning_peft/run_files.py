"""Names and readers of the files a training run leaves in its run folder; no torch or Lightning imports.

Shared by the callbacks that write them and by `lpeft publish` (hub/runinfo.py), which reads them without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_peft.errors import DataError

HISTORY_FILE = "metrics.jsonl"  # MetricHistory: one JSON object per logging call
SUMMARY_FILE = "run_summary.json"  # RunSummary: steps, tokens, duration, hardware
CSV_METRICS_FILE = "metrics.csv"  # Lightning's CSVLogger (runs made before MetricHistory have only this one)


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file; a last line cut short (a crash while it was appended) is left out."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a readable text file: {err}") from err
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError as err:
            if number == len(lines):
                break
            raise DataError(f"{path} line {number} is not JSON ({err}); the file was altered.") from err
        if isinstance(row, dict):
            rows.append(row)
    return rows
