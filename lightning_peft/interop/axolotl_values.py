"""Reading Axolotl's values as Axolotl does: null and empty mean unset, numbers may arrive as strings."""

from __future__ import annotations

import json
import math
from typing import Any

from lightning_peft.errors import ConfigError


def unset(value: Any) -> bool:
    """Whether Axolotl reads `value` as not set: null, or an empty string, list or mapping."""
    return value is None or (isinstance(value, str | list | dict) and not value)


def number(key: str, value: Any) -> float:
    """`value` as a float; raises `ConfigError` naming `key` when it is not a number."""
    # YAML 1.1 reads 2e-4 (no dot) as a string; Axolotl converts it, so do we.
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{key}`={value!r} is not a number.") from None
    if isinstance(value, bool) or math.isnan(result):
        raise ConfigError(f"`{key}`={value!r} is not a number.")
    return result


def integer(key: str, value: Any) -> int:
    """`value` as an int; raises `ConfigError` naming `key` when it is not a whole number."""
    whole = number(key, value)
    if not whole.is_integer():
        raise ConfigError(f"`{key}`={value!r} must be a whole number.")
    return int(whole)


def show(value: Any, limit: int = 80) -> str:
    """A value on one short line, for the header and the warnings."""
    text = value if isinstance(value, str) and "\n" not in value else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
