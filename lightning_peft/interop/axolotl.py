"""Axolotl LoRA/QLoRA configs → lightning-peft run configs (`lpeft convert axolotl.yml -o run.yaml`).

`convert_axolotl_file` reads the YAML, `convert_axolotl` converts it (`axolotl_convert.Converter`, with the key
tables of `axolotl_keys`), `Conversion.to_yaml` writes the run config under a header that lists every Axolotl
setting not carried over and why, and `write_run_config` puts it on disk atomically.

Pure: no torch and no data or model code is imported, so converting runs anywhere in a blink.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError
from lightning_peft.interop.axolotl_convert import Converter, Dropped

__all__ = ["Conversion", "Dropped", "convert_axolotl", "convert_axolotl_file", "write_run_config"]


@dataclass
class Conversion:
    """A converted run: the lightning-peft config, and what could not be carried.

    Attributes:
        config: The run config (`seed_everything`, `model`, `data`, `trainer`), as `lpeft fit --config` reads it.
        dropped: Every Axolotl setting not carried over, with the reason.
        notes: What to check before running (a Hub data set to download, a changed default ...).
        carried: The top-level Axolotl keys that were carried over (in full or in part).
    """

    config: dict[str, Any]
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line per setting not carried over, then one per note."""
        return [f"not carried over: {d.line()}" for d in self.dropped] + self.notes

    def to_yaml(self, source: str = "an Axolotl config") -> str:
        """The config as YAML, under a comment header listing what was not carried over and why."""
        import yaml

        header = [f"# Converted from {source} by `lpeft convert`. Run it with: lpeft fit --config <this file>"]
        root = self.config.get("trainer", {}).get("default_root_dir", ".")
        header.append(f"# The adapter is written to {root}/lightning_logs/version_N/adapter.")
        if self.dropped:
            header.append(f"# Not carried over ({len(self.dropped)}):")
            header += [f"#   {d.line()}" for d in self.dropped]
        else:
            header.append("# Every Axolotl setting was carried over.")
        if self.notes:
            header.append("# Check before running:")
            header += [f"#   {note}" for note in self.notes]
        body = yaml.safe_dump(self.config, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
        return "\n".join(header) + "\n" + body


def convert_axolotl(source: Mapping[str, Any]) -> Conversion:
    """Convert a parsed Axolotl config (LoRA or QLoRA) into a lightning-peft run config.

    Raises:
        ConfigError: not a mapping, no `base_model`, no or an unknown `adapter`, or contradictory settings.
    """
    if not isinstance(source, Mapping):
        raise ConfigError(f"an Axolotl config is a mapping of settings, got {type(source).__name__}.")
    return Conversion(*Converter(source).run())


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


def write_run_config(text: str, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write `text` to `out` atomically (a temporary file in the same folder, then renamed over it).

    Raises:
        ConfigError: `out` exists and `force` is false, or it is a folder.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"`-o` {out} is a folder; give the path of the YAML file to write.")
    if out.exists() and not force:
        raise ConfigError(f"`-o` {out} exists; choose another file or pass --force to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(staging, out)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return out
