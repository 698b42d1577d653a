"""What the training run recorded about how the base was loaded: its quantization, read from the run's files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError, DataError
from lightning_peft.models import QUANTIZATIONS
from lightning_peft.run_files import RUN_YAML_FILES, read_run_yaml

log = logging.getLogger(__name__)


def training_quantization(
    adapter_dir: Path, quantization: str | None, options: dict[str, Any] | None
) -> tuple[str, dict[str, Any] | None, str]:
    """The quantization the base had in training: given, else read from the run's files, else none.

    Returns:
        (quantization, its `BitsAndBytesConfig` options, where it came from: `argument`, a file path or `default`).
    """
    if quantization is not None:
        return quantization, options, "argument"
    for name in RUN_YAML_FILES:
        path = adapter_dir.parent / name
        found = _quantization_in(path) if path.is_file() else None
        if found is not None:
            found_quantization, found_options = found
            if found_quantization not in QUANTIZATIONS:
                raise ConfigError(f"{path} has quantization={found_quantization!r}; pass `quantization` yourself.")
            log.info("Quantization in training: %s (read from %s)", found_quantization, path)
            return found_quantization, options if options is not None else found_options, str(path)
    return "none", options, "default"


def _quantization_in(path: Path) -> tuple[str, dict[str, Any] | None] | None:
    """The module's `quantization` (and options) in hparams.yaml (top level) or config.yaml (`model.init_args`).

    A file that cannot be read says nothing: the next one, or the default, is used.
    """
    try:
        data = read_run_yaml(path)
    except DataError:
        return None
    if not isinstance(data, dict):
        return None
    section = data.get("model", data) if isinstance(data.get("model"), dict) else data
    section = section.get("init_args", section) if isinstance(section.get("init_args"), dict) else section
    if "quantization" not in section:
        return None
    options = section.get("quantization_options")
    return str(section["quantization"]), options if isinstance(options, dict) else None
