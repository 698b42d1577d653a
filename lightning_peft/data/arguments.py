"""The `SFTDataModule` arguments checked together, so one ConfigError reports every problem before any data is read.

The data sources are parsed here (see `sources.py`); whether a file exists or a Hub data set loads is checked when
`setup()` reads it, still before training starts.
"""

from __future__ import annotations

import os
from typing import Any

from lightning_peft.data.chat_templates import resolve as resolve_chat_template
from lightning_peft.data.formats import FIELDS, FORMATS
from lightning_peft.data.sources import DataSource, parse_mixture, parse_source, role_problems
from lightning_peft.errors import ConfigError

# The settings that each take one source.
SETTINGS = ("train_file", "val_file", "test_file", "predict_file")


def validate_arguments(**args: Any) -> tuple[dict[str, DataSource], list[DataSource]]:
    """Every problem with the arguments, in one ConfigError; else the parsed sources and mixture."""
    problems: list[str] = []
    sources, mixture = _sources(args, problems)
    fraction = args["val_fraction"]
    if fraction is not None and not (isinstance(fraction, int | float) and 0 < fraction < 1):
        problems.append(f"`val_fraction`={fraction!r} must be a number between 0 and 1 (both excluded)")
    if args["val_file"] and fraction is not None:
        problems.append(
            f"`val_file`={args['val_file']!r} and `val_fraction`={fraction!r} were both given; "
            "give a validation file or a fraction of train_file to hold out, not both"
        )
    if args["format"] not in ("auto", *FORMATS):
        problems.append(f"`format`={args['format']!r} must be one of auto, {', '.join(FORMATS)}")
    problems.extend(_column_problems(args["columns"]))
    problems.extend(role_problems(args["roles"]))
    if args["chat_template"] is not None:
        try:
            resolve_chat_template(args["chat_template"])
        except ConfigError as err:
            problems.append(str(err))
    limits = (("max_length", 2), ("batch_size", 1), ("val_batch_size", 1), ("num_workers", 0), ("num_proc", 1))
    for name, least in limits:
        value = args[name]
        if value is None and name in ("val_batch_size", "num_proc"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            problems.append(f"`{name}`={value!r} must be an integer of at least {least}")
    if problems:
        raise ConfigError("SFTDataModule: " + "; ".join(p.rstrip(".") for p in problems) + ".")
    return sources, mixture


def _sources(args: dict[str, Any], problems: list[str]) -> tuple[dict[str, DataSource], list[DataSource]]:
    """The data settings parsed (see `sources.py`); what is wrong with them is added to `problems`."""
    sources, mixture = {}, []
    for name in SETTINGS:
        value = args[name]
        if value is None:
            continue
        if isinstance(value, str | os.PathLike) and not str(value).strip():
            problems.append(f"`{name}`={value!r} must be the path of a data file or folder, or a Hub data set id")
            continue
        try:
            sources[name] = parse_source(value if isinstance(value, dict) else str(value), name)
        except ConfigError as err:
            problems.append(str(err))
    if args["train_datasets"] is not None:
        if args["train_file"] is not None:
            problems.append("`train_file` and `train_datasets` were both given; put the file into the list instead")
        try:
            mixture = parse_mixture(args["train_datasets"])
        except ConfigError as err:
            problems.append(str(err))
    return sources, mixture


def _column_problems(columns: Any) -> list[str]:
    if columns is None:
        return []
    if not isinstance(columns, dict):
        return [f"`columns`={columns!r} must be a mapping from field name to column name"]
    problems = []
    unknown = sorted(map(str, set(columns) - set(FIELDS)))
    if unknown:
        problems.append(f"`columns` has unknown fields {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    bad = {k: v for k, v in columns.items() if not isinstance(v, str) or not v}
    if bad:
        problems.append(f"`columns` values must be column names (non-empty strings), got {bad!r}")
    return problems
