"""Hugging Face Hub data sets through `datasets.load_dataset`: loading, one-line errors, and a cache identity.

`datasets` keeps what it downloads in its own cache (`HF_DATASETS_CACHE`, under `HF_HOME`), so with
`HF_HUB_OFFLINE=1` a data set loaded once before loads again without the network. The tokenized-data cache
(`cache.py`) keys a Hub source by its id, subset, split, revision, the commit it resolved to and the fingerprint
`datasets` gives the loaded table, so a new commit of the data set is tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from lightning_peft.data.readers import Records
from lightning_peft.data.sources import DataSource
from lightning_peft.errors import DataError, require

log = logging.getLogger(__name__)

# `datasets` stores a Hub data set's Arrow files under a folder named after the commit it resolved to.
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubData:
    """One split of a Hub data set, loaded (memory-mapped Arrow: rows are read only when asked for).

    Attributes:
        source: what was asked for.
        dataset: the `datasets.Dataset`.
        commit: the commit sha the data came from, when `datasets` reveals it (None otherwise).
    """

    def __init__(self, source: DataSource, dataset: Any) -> None:
        self.source, self.dataset = source, dataset
        self.commit = resolved_commit(dataset)

    def digest(self) -> str:
        """sha256 over everything that identifies the rows: id, subset, split, revision, commit, fingerprint."""
        identity = {
            "hub": self.source.path,
            "name": self.source.name,
            "split": self.source.split,
            "revision": self.source.revision,
            "data_files": self.source.data_files,
            "commit": self.commit,
            "fingerprint": getattr(self.dataset, "_fingerprint", None),
            "rows": len(self.dataset),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def records(self) -> Records:
        """The rows as plain dicts; messages point at them as `NAME:SPLIT index i` (0-based, as `dataset[i]`)."""
        rows = self.dataset.to_list()
        if not rows:
            raise DataError(f"{self.source.label} holds no examples; choose another split or subset.")
        return Records(Path(f"{self.source.path}:{self.source.split}"), rows, "index")


def load_hub_dataset(source: DataSource) -> HubData:
    """Load `source` (a Hub data set) with `datasets.load_dataset`, from its cache when offline.

    Raises:
        DataError: one line naming the setting, the id and the fix: unknown id, subset or split, an unreachable
            Hub, or offline without a cached copy.
        MissingDependencyError: `datasets` is not installed.
    """
    require("datasets", purpose="loading Hub data sets (the `data` extra: pip install 'lightning-peft[data]')")
    import datasets

    try:
        dataset = datasets.load_dataset(
            source.path,
            name=source.name,
            split=source.split,
            revision=source.revision,
            data_files=source.data_files,
        )
    except Exception as err:  # datasets and huggingface_hub raise many unrelated types; each becomes one line
        raise DataError(hub_error_message(source, err)) from None
    data = HubData(source, dataset)
    log.debug("Loaded %s (%d rows, commit %s)", source.label, len(dataset), data.commit or "unknown")
    return data


def resolved_commit(dataset: Any) -> str | None:
    """The commit sha in the path of the data set's Arrow cache files, or None (in memory, or another layout)."""
    for entry in getattr(dataset, "cache_files", None) or []:
        for part in reversed(Path(entry.get("filename", "")).parts):
            if _COMMIT.match(part):
                return part
    return None


def hub_error_message(source: DataSource, err: Exception) -> str:
    """One line for a failed `load_dataset`: the setting, the id, what went wrong and how to fix it."""
    reason = _first_line(err)
    where = f"`{source.setting}`={source.path!r}"
    if _kind(err) == "split":
        return f"{where}: {reason}; set `split` to one of them, e.g. {{path: {source.path}, split: ...}}."
    if _kind(err) == "subset":
        return f"{where}: {reason}; set `name` to one of the data set's subsets."
    if _offline():
        return (
            f"{where}: HF_HUB_OFFLINE=1 and the `datasets` cache cannot provide the Hub data set {source.label} "
            f"({reason}); load it once online with the same name, split and revision, or unset HF_HUB_OFFLINE."
        )
    if _kind(err) == "network":
        return (
            f"{where}: the Hub is unreachable for {source.label} ({reason}); check the network and HF_ENDPOINT, or "
            "set HF_HUB_OFFLINE=1 to use the `datasets` cache."
        )
    return (
        f"{where}: no local file or folder of that name, and the Hub data set {source.label} could not be loaded "
        f"({reason}); check the path or the id (and its name, split and revision), and log in for a private one."
    )


def _kind(err: Exception) -> str:
    text = str(err)
    if "Unknown split" in text or "Bad split" in text:
        return "split"
    if "BuilderConfig" in text or "config name is missing" in text.lower():
        return "subset"
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "ConnectError", "OfflineModeIsEnabled"}:
        return "network"
    return "other"


def _offline() -> bool:
    import datasets.config
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _first_line(err: Exception, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
