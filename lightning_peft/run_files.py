"""Names and readers of the files a training run leaves in its run folder; no torch or Lightning imports.

Shared by the callbacks that write them, by `lpeft publish` (hub/runinfo.py) and by `lpeft merge`
(merging/run_settings.py), which read them without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_peft.errors import DataError

HISTORY_FILE = "metrics.jsonl"  # MetricHistory: one JSON object per logging call
SUMMARY_FILE = "run_summary.json"  # RunSummary: steps, tokens, duration, hardware
CSV_METRICS_FILE = "metrics.csv"  # Lightning's CSVLogger (runs made before MetricHistory have only this one)
HPARAMS_FILE = "hparams.yaml"  # the module's and data module's hyperparameters (CSV/TensorBoard loggers)
CONFIG_FILE = "config.yaml"  # LightningCLI's full run configuration
LM_EVAL_FILE = "lm_eval.json"  # LmEvalCallback: harness scores of the base before and the adapter after training
RUN_YAML_FILES = (HPARAMS_FILE, CONFIG_FILE)  # in the order they are read: hparams.yaml wins


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


def read_run_yaml(path: Path) -> Any:
    """A run's hparams.yaml or config.yaml as plain data.

    Python-object tags (which Lightning writes for some hyperparameters) become None instead of failing: they
    are never constructed.

    Raises:
        DataError: the file cannot be read or is not valid YAML.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=Loader)  # a SafeLoader subclass
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid YAML: {err}") from err
