"""What an Axolotl conversion returns: the run config and what it could not carry (`Conversion`, `Dropped`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_peft.interop.axolotl_values import show


@dataclass(frozen=True)
class Dropped:
    """An Axolotl setting the converted config does not carry.

    Attributes:
        key: Where it was, e.g. `deepspeed` or `datasets[0].roles_to_train`.
        value: What it held.
        reason: Why it is not carried, and what to do instead.
    """

    key: str
    value: Any
    reason: str

    def line(self) -> str:
        return f"{self.key}={show(self.value)}: {self.reason}"


@dataclass(frozen=True)
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
