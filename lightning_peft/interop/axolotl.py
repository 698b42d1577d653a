"""Axolotl LoRA/QLoRA configs → lightning-peft run configs (`lpeft convert axolotl.yml -o run.yaml`).

`convert_axolotl_file` reads the YAML, `convert_axolotl` converts it (`axolotl_convert.Converter`, with the key
tables of `axolotl_keys`), `Conversion.to_yaml` writes the run config under a header that lists every Axolotl
setting not carried over and why, and `write_run_config` puts it on disk atomically.

Pure: no torch and no data or model code is imported, so converting runs anywhere in a blink.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_peft.atomic import write_text
from lightning_peft.errors import ConfigError
from lightning_peft.interop.axolotl_convert import Converter
from lightning_peft.interop.axolotl_result import Conversion, Dropped

__all__ = ["Conversion", "Dropped", "convert_axolotl", "convert_axolotl_file", "write_run_config"]


def convert_axolotl(source: Mapping[str, Any]) -> Conversion:
    """Convert a parsed Axolotl config (LoRA or QLoRA) into a lightning-peft run config.

    Raises:
        ConfigError: not a mapping, no `base_model`, no or an unknown `adapter`, or contradictory settings.
    """
    if not isinstance(source, Mapping):
        raise ConfigError(f"an Axolotl config is a mapping of settings, got {type(source).__name__}.")
    return Converter(source).run()


def convert_axolotl_file(path: str | os.PathLike) -> Conversion:
    """Read an Axolotl YAML file and convert it (see `convert_axolotl`).

    Raises:
        ConfigError: unreadable or invalid YAML, or a config that cannot be converted; the message names the file.
    """
    import yaml

    path = Path(path)
    try:
        source = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read: {err}.") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ConfigError(f"{path} is not valid YAML{at}: {getattr(err, 'problem', None) or err}.") from None
    if not isinstance(source, Mapping):
        kind = "empty" if source is None else f"a {type(source).__name__}"
        raise ConfigError(f"{path} is {kind}, not a mapping of Axolotl settings (base_model, adapter, datasets ...).")
    try:
        return convert_axolotl(source)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def write_run_config(text: str, out: str | os.PathLike, *, overwrite: bool = False, force: bool | None = None) -> Path:
    """Write `text` to `out` atomically (`lightning_peft.atomic.write_text`).

    Args:
        overwrite: Replace an existing file.
        force: The old name of `overwrite` (deprecated).

    Raises:
        ConfigError: `out` exists and `overwrite` is false, or it is a folder.
    """
    if force is not None:
        warnings.warn("write_run_config: `force` is deprecated; use `overwrite`.", DeprecationWarning, stacklevel=2)
        overwrite = overwrite or force
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"`-o` {out} is a folder; give the path of the YAML file to write.")
    if out.exists() and not overwrite:
        raise ConfigError(f"`-o` {out} exists; choose another file or pass --overwrite to replace it.")
    write_text(out, text)
    return out
