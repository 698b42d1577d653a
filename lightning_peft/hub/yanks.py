"""Retracted versions (PEP 592's "yank"): which versions of a repo are yanked, and why.

A yanked version stays downloadable by its exact version, so a pinned pull still reproduces; no range (`^1`,
`~1.2`, `latest`, `>=1,<2`) resolves to it (see `versions.resolve`). The published version itself is never
changed: the yanks of a repo live beside its versions, in one `yanked.json` (at the repo's folder in a local
registry, at the repo root on the Hub, where adding it is one commit and the version tags stay):

    {"format": "lightning-peft/yanked", "versions": {"1.1.0": {"reason": "...", "yanked_at": "2026-...Z"}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from lightning_peft.errors import ConfigError, CorruptFileError
from lightning_peft.hub.manifest import dumps

YANKED_FILE = "yanked.json"
YANKED_FORMAT = "lightning-peft/yanked"


@dataclass(frozen=True)
class Yank:
    """Why and when a version was yanked."""

    reason: str
    yanked_at: str | None = None


def parse(raw: bytes | None, *, where: str) -> dict[str, Yank]:
    """The yanks recorded in a `yanked.json` (None: no file, nothing yanked), by version string.

    Raises:
        CorruptFileError: the file is not the JSON object this module writes.
    """
    if raw is None:
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
        versions = data["versions"] if data.get("format") == YANKED_FORMAT else None
        if not isinstance(versions, dict):
            raise ValueError(f"not a {YANKED_FORMAT} file")
        return {v: Yank(str(e["reason"]), e.get("yanked_at")) for v, e in versions.items()}
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise CorruptFileError(
            f"{where}: {YANKED_FILE} is damaged ({err}); restore it from a backup or yank the versions again."
        ) from None


def dump(yanks: Mapping[str, Yank]) -> bytes:
    """Canonical JSON bytes for `yanks`."""
    versions: dict[str, Any] = {v: {"reason": y.reason, "yanked_at": y.yanked_at} for v, y in yanks.items()}
    return dumps({"format": YANKED_FORMAT, "versions": versions})


def reason(yanks: Mapping[str, Yank], version: object) -> str | None:
    """Why `version` is yanked, or None when it is not."""
    found = yanks.get(str(version))
    return found.reason if found else None


def check_reason(reason: str | None, where: str) -> str:
    """A yank needs a reason: it is what people see when a range skips the version.

    Raises:
        ConfigError: no reason, or an empty one.
    """
    text = " ".join((reason or "").split())
    if not text:
        raise ConfigError(f"`--reason` is required to yank {where}: say why, e.g. --reason 'wrong base weights'.")
    return text


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def changed(yanks: dict[str, Yank], version: str, reason: str | None, where: str) -> dict[str, Yank]:
    """`yanks` with `version` yanked for `reason`, or unyanked when `reason` is None.

    Raises:
        ConfigError: unyanking a version that is not yanked.
    """
    result = dict(yanks)
    if reason is not None:
        result[version] = Yank(reason, now())
    elif result.pop(version, None) is None:
        raise ConfigError(f"{where} is not yanked; nothing to unyank (`lpeft versions` shows the yanked ones).")
    return dict(sorted(result.items()))
