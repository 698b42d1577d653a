"""Where data comes from: a local file or folder, or a Hugging Face Hub data set, as the user wrote it.

Every data setting (`train_file`, `val_file`, `test_file`, `predict_file` and each entry of `train_datasets`) takes
either a string or a mapping, in the shape Axolotl users already write under `datasets:`:

    train_file: data/train.jsonl                        # a local file or save_to_disk folder
    train_file: HuggingFaceH4/ultrachat_200k            # ORG/NAME: the Hub, when no such local path exists
    train_file: hf://datasets/HuggingFaceH4/ultrachat_200k@main   # explicitly the Hub, optionally @revision
    train_file: {path: HuggingFaceH4/ultrachat_200k, name: default, split: train_sft, revision: main}

A mapping may also give the entry's own `format`, `columns` and `roles`, and in `train_datasets` its `weight` or `count`.
This module only parses and checks; `hub_datasets` loads from the Hub and `mixing` combines several sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.data.formats import FIELDS, FORMATS, ROLES
from lightning_peft.data.readers import SUFFIXES
from lightning_peft.errors import ConfigError

HF_PREFIX = "hf://datasets/"
# A Hub repo id: ORG/NAME with letters, digits, '-', '_' and '.', neither part starting with '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9_-][\w.-]*/[A-Za-z0-9_-][\w.-]*$")
KEYS = ("path", "name", "split", "revision", "data_files", "format", "columns", "roles", "weight", "count")
_HUB_ONLY = ("name", "revision", "data_files")
# The split a plain Hub id means for each setting; a mapping's `split` chooses another.
DEFAULT_SPLITS = {"train_file": "train", "val_file": "validation", "test_file": "test", "predict_file": "test"}


@dataclass(frozen=True)
class DataSource:
    """One data source, checked.

    Attributes:
        path: the local path, or the Hub data set id (ORG/NAME, without `hf://datasets/`).
        hub: whether `path` is a Hub data set id (loaded with `datasets.load_dataset`).
        setting: the setting that gave it, for messages, e.g. "data.train_file" or "data.train_datasets[1]".
        name: the Hub data set's subset (configuration name), if any.
        split: the split to read from the Hub data set.
        revision: the Hub branch, tag or commit (default: the main branch).
        data_files: the files of the Hub repo to read, when not its declared splits (as `load_dataset` takes them).
        format: this source's data format; None uses `data.format`.
        columns: this source's column mapping; None uses `data.columns`.
        roles: this source's role mapping; None uses `data.roles`.
        weight: in a mixture, a multiplier of this source's size (0.5 takes half its examples, 2 each twice).
        count: in a mixture, exactly this many examples from this source.
    """

    path: str
    hub: bool
    setting: str
    name: str | None = None
    split: str | None = None
    revision: str | None = None
    data_files: str | list[str] | dict[str, Any] | None = field(default=None, hash=False)
    format: str | None = None
    columns: dict[str, str] | None = field(default=None, hash=False)
    roles: dict[str, str] | None = field(default=None, hash=False)
    weight: float | None = None
    count: int | None = None

    @property
    def label(self) -> str:
        """How messages and logs name it: the path, or the Hub id with its subset, split and revision."""
        if not self.hub:
            return self.path
        extras = [f"{key} {value}" for key, value in (("subset", self.name), ("split", self.split)) if value]
        if self.revision:
            extras.append(f"revision {self.revision}")
        return f"{self.path} ({', '.join(extras)})" if extras else self.path


def describe(source: DataSource, role: str) -> dict[str, Any]:
    """What a run records about one of its sources (`run_summary.json`'s `data`, then the model card).

    A Hub source by its id, subset, split and revision; a local one by its file or folder name only: a card must
    neither publish a machine's paths nor declare a local file a Hub data set.
    """
    if source.hub:
        return {"role": role, "hub": True, "id": source.path, "subset": source.name, "split": source.split,
                "revision": source.revision}  # fmt: skip
    return {"role": role, "hub": False, "name": Path(source.path).name}


def parse_source(value: Any, setting: str, mixture: bool = False) -> DataSource:
    """The `DataSource` a setting's value describes.

    Args:
        value: a path or Hub id string, or a mapping with the keys in `KEYS`.
        setting: the setting's name for messages and its default split, e.g. "train_file" or "train_datasets[0]".
        mixture: whether `weight` and `count` are allowed (entries of `train_datasets`).

    Raises:
        ConfigError: every problem with the value, in one line.
    """
    entry = _as_mapping(value, setting)
    problems = _entry_problems(entry, setting, mixture)
    if problems:
        raise ConfigError(f"`{setting}`: " + "; ".join(problems) + ".")
    path, hub, revision = _locate(str(entry["path"]).strip(), entry.get("revision"), setting)
    if not hub and (local := [key for key in (*_HUB_ONLY, "split") if entry.get(key) is not None]):
        raise ConfigError(
            f"`{setting}`: {', '.join(local)} apply to Hub data sets, but {path!r} is a local path "
            "(a file is read whole, a save_to_disk folder by its train split); drop them or give a Hub id."
        )
    split = entry.get("split") or (DEFAULT_SPLITS.get(setting.partition("[")[0], "train") if hub else None)
    weight, count = entry.get("weight"), entry.get("count")
    return DataSource(
        path=path,
        hub=hub,
        setting=f"data.{setting}",
        name=entry.get("name"),
        split=split,
        revision=revision,
        data_files=entry.get("data_files"),
        format=entry.get("format"),
        columns=dict(entry["columns"]) if entry.get("columns") else None,
        roles=dict(entry["roles"]) if entry.get("roles") else None,
        weight=float(weight) if weight is not None else None,
        count=int(count) if count is not None else None,
    )


def parse_mixture(values: Any, setting: str = "train_datasets") -> list[DataSource]:
    """The sources of `train_datasets`; raises `ConfigError` unless it is a non-empty list of valid entries."""
    if not isinstance(values, list | tuple) or not values:
        raise ConfigError(
            f"`{setting}`={values!r} must be a non-empty list of data sets, e.g. "
            "[{path: ORG/NAME, split: train, weight: 1.0}, {path: data/extra.jsonl, count: 500}]."
        )
    return [parse_source(value, f"{setting}[{i}]", mixture=True) for i, value in enumerate(values)]


def is_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hub data set id: `hf://datasets/...`, or ORG/NAME naming no local path.

    A local path wins: `data/train` is read from disk when it exists. Names ending in a data file suffix
    (`data/train.jsonl`) are always local, so a missing local file is reported as missing, not looked up online.
    """
    if text.startswith(HF_PREFIX):
        return True
    name = text.partition("@")[0]
    return bool(_HUB_ID.match(name)) and not name.lower().endswith(SUFFIXES) and not Path(text).expanduser().exists()


def _as_mapping(value: Any, setting: str) -> dict[str, Any]:
    if isinstance(value, str | Path):
        return {"path": str(value)}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    raise ConfigError(
        f"`{setting}`={value!r} must be a path, a Hub data set id (ORG/NAME) or a mapping such as "
        "{path: ORG/NAME, name: SUBSET, split: train, revision: main}."
    )


def _entry_problems(entry: dict[str, Any], setting: str, mixture: bool) -> list[str]:
    problems = []
    if unknown := sorted(set(entry) - set(KEYS)):
        problems.append(f"unknown keys {', '.join(unknown)} (the keys are {', '.join(KEYS)})")
    path = entry.get("path")
    if not isinstance(path, str | Path) or not str(path).strip():
        problems.append(f"`path`={path!r} must be a local path or a Hub data set id such as ORG/NAME")
    for key in ("name", "split", "revision"):
        if entry.get(key) is not None and (not isinstance(entry[key], str) or not entry[key]):
            problems.append(f"`{key}`={entry[key]!r} must be a non-empty string")
    if entry.get("format") is not None and entry["format"] not in ("auto", *FORMATS):
        problems.append(f"`format`={entry['format']!r} must be one of auto, {', '.join(FORMATS)}")
    columns = entry.get("columns")
    if columns is not None and (not isinstance(columns, dict) or set(columns) - set(FIELDS)):
        problems.append(f"`columns`={columns!r} must map fields ({', '.join(FIELDS)}) to the data's column names")
    problems.extend(role_problems(entry.get("roles")))
    problems.extend(_amount_problems(entry, mixture))
    return problems


def role_problems(roles: Any) -> list[str]:
    """What is wrong with a `roles` setting: it must map the data's role names onto the standard roles."""
    if roles is None:
        return []
    if not isinstance(roles, dict) or not all(isinstance(k, str) and k for k in roles):
        return [f"`roles`={roles!r} must map the data's role names to {', '.join(ROLES)}, e.g. {{human: user}}"]
    bad = {k: v for k, v in roles.items() if v not in ROLES}
    if bad:
        return [f"`roles` maps {bad!r} to no standard role; map each role name to one of {', '.join(ROLES)}"]
    return []


def _amount_problems(entry: dict[str, Any], mixture: bool) -> list[str]:
    weight, count = entry.get("weight"), entry.get("count")
    if not mixture:
        given = [key for key in ("weight", "count") if entry.get(key) is not None]
        return [f"{' and '.join(given)} apply to entries of data.train_datasets only"] if given else []
    problems = []
    if weight is not None and count is not None:
        problems.append(f"give `weight` ({weight!r}) or `count` ({count!r}), not both")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0):
        problems.append(f"`weight`={weight!r} must be a number above 0 (a multiplier of the data set's size)")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        problems.append(f"`count`={count!r} must be an integer of at least 1 (the examples to take)")
    return problems


def _locate(text: str, revision: str | None, setting: str) -> tuple[str, bool, str | None]:
    """(path or Hub id, whether it is the Hub, revision): `hf://datasets/ORG/NAME@REV` carries its revision."""
    if not is_hub_id(text):
        return text, False, revision
    repo_id, _, at = text.removeprefix(HF_PREFIX).strip("/").partition("@")
    if at and revision and at != revision:
        raise ConfigError(
            f"`{setting}.path`={text!r} names revision {at!r} but `revision`={revision!r}; give one of them."
        )
    if not _HUB_ID.match(repo_id):
        raise ConfigError(
            f"`{setting}.path`={text!r} is not a Hub data set id; write hf://datasets/ORG/NAME[@REVISION]."
        )
    return repo_id, True, at or revision
