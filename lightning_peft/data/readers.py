"""Data files → records (plain dicts), each remembering where it came from for error messages.

Supported sources: JSON Lines, JSON, CSV, Parquet and a folder written by `datasets`' `save_to_disk`. Line-based
text files report 1-based line numbers (what an editor shows); JSON lists, Parquet and `datasets` folders report
0-based indices (what `rows[i]` or `dataset[i]` would take in Python).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.errors import DataError, require

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = (*JSONL_SUFFIXES, ".json", ".csv", ".parquet")
SUPPORTED = (
    "JSON Lines (.jsonl, .ndjson), JSON (.json), CSV (.csv), Parquet (.parquet) or a `datasets` save_to_disk folder"
)


@dataclass
class Records:
    """The rows of one data file and how to point at each of them in a message.

    Attributes:
        path: the file or folder the rows were read from.
        rows: one dict per example, keyed by the file's column names.
        unit: "line" (1-based) or "index" (0-based), the word used in messages.
        numbers: the line number or index of each row (blank JSONL lines are skipped, so they differ from i).
    """

    path: Path
    rows: list[dict[str, Any]]
    unit: str = "index"
    numbers: list[int] = field(default_factory=list)

    def where(self, i: int) -> str:
        """Where row `i` lives, e.g. "train.jsonl line 7"."""
        number = self.numbers[i] if self.numbers else i
        return f"{self.path.name} {self.unit} {number}"

    @property
    def columns(self) -> list[str]:
        """The columns of the first row (files are expected to share one schema)."""
        return list(self.rows[0]) if self.rows else []


def read_records(path: str | Path) -> Records:
    """Read every example of a data file or `datasets` folder.

    Raises:
        DataError: the path is missing, has an unsupported extension, is malformed or holds no example.
        MissingDependencyError: Parquet or `datasets` folders without pyarrow / datasets installed.
    """
    path = require_exists(path)
    try:
        records = _read_saved_dataset(path) if path.is_dir() else _read_file(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path.name}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8.") from None
    require_rows(path, len(records.rows))
    return records


def require_rows(path: str | Path, rows: int) -> None:
    """Raises `DataError` when a data file holds no row."""
    if not rows:
        raise DataError(f"{path} holds no examples; give a file with at least one row.")


def require_exists(path: str | Path, setting: str = "data.train_file/val_file") -> Path:
    """`path` as a Path; raises `DataError` naming it (and the `setting` that gave it) when it does not exist."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Data file {str(path)!r} does not exist; check the path given to {setting}.")
    return path


def _read_file(path: Path) -> Records:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path.name} has the unsupported extension {suffix!r}; use {SUPPORTED}.")


def _read_jsonl(path: Path) -> Records:
    return read_jsonl_range(path, 0, path.stat().st_size, 1)


@dataclass(frozen=True)
class RowChunk:
    """A run of consecutive rows of one data source: a byte range of a JSON Lines file, or rows already read.

    Attributes:
        first_row: the index, in the whole source, of the chunk's first row.
        n_rows: how many rows it holds.
        path: the JSON Lines file whose bytes [start, end) hold the rows (when `records` is None).
        first_line: the 1-based line number of byte `start`.
        records: the rows themselves, for sources that are read whole.
    """

    first_row: int
    n_rows: int
    path: Path | None = None
    start: int = 0
    end: int = 0
    first_line: int = 1
    records: Records | None = None

    def read(self) -> Records:
        """The chunk's rows; their `where` names the lines (or indices) of the whole file."""
        if self.records is not None:
            return self.records
        assert self.path is not None
        return read_jsonl_range(self.path, self.start, self.end, self.first_line)


def jsonl_chunks(path: Path, rows: int) -> list[RowChunk]:
    """Byte ranges of `rows` non-blank lines each, found by one pass over the bytes (nothing is parsed)."""
    chunks, start, position, line, first_line, count, first_row = [], 0, 0, 0, 1, 0, 0
    with path.open("rb") as handle:
        for raw in handle:
            line += 1
            position += len(raw)
            count += bool(raw.strip())
            if count == rows:
                chunks.append(RowChunk(first_row, count, path, start, position, first_line))
                first_row, count, start, first_line = first_row + count, 0, position, line + 1
    if count:
        chunks.append(RowChunk(first_row, count, path, start, position, first_line))
    return chunks


def records_chunks(records: Records, rows: int) -> list[RowChunk]:
    """Slices of `rows` rows of records already read, each still naming its rows as the whole file does."""
    numbers = records.numbers or list(range(len(records.rows)))
    return [
        RowChunk(i, len(part), records=Records(records.path, part, records.unit, numbers[i : i + rows]))
        for i in range(0, len(records.rows), rows)
        if (part := records.rows[i : i + rows])
    ]


def read_jsonl_range(path: Path, start: int, end: int, first_line: int) -> Records:
    """The rows of bytes [start, end) of a JSON Lines file whose byte `start` begins line `first_line`."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}).") from None
    try:
        # utf-8-sig drops a byte-order mark that Windows tools like to write at the start of a file.
        text = data.decode("utf-8-sig" if start == 0 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path.name}: not UTF-8 text (byte {start + err.start}: {err.reason}); save it as UTF-8."
        ) from None
    rows, numbers = [], []
    for number, line in enumerate(text.split("\n"), start=first_line):
        if not line.strip(_ASCII_SPACE):
            continue
        rows.append(_json_object(path, line, number))
        numbers.append(number)
    return Records(path, rows, "line", numbers)


# What `bytes.strip()` removes: the chunk scanner and the parser must agree on which lines are blank.
_ASCII_SPACE = " \t\n\r\x0b\x0c"


def _json_object(path: Path, line: str, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path.name} line {number}: malformed JSON ({err.msg} at column {err.colno}); "
            "each line must hold one JSON object."
        ) from None
    if not isinstance(row, dict):
        raise DataError(
            f"{path.name} line {number}: expected a JSON object, got {type(row).__name__}; "
            'each line must hold one JSON object such as {"text": ...}.'
        )
    return row


def _read_json(path: Path) -> Records:
    with _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path.name} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})."
            ) from None
    if isinstance(data, dict):
        data = _single_list(path, data)
    if not isinstance(data, list):
        raise DataError(
            f"{path.name}: expected a JSON list of objects (or an object holding one), got {type(data).__name__}."
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path.name} index {i}: expected a JSON object, got {type(row).__name__}.")
    return Records(path, data, "index")


def _single_list(path: Path, data: dict[str, Any]) -> list[Any]:
    # Files like {"data": [...]} or {"train": [...]} are common; take the one list, refuse to guess among several.
    lists = [key for key, value in data.items() if isinstance(value, list)]
    if len(lists) != 1:
        raise DataError(
            f"{path.name}: a JSON object must hold exactly one list of examples, found {len(lists)} "
            f"(keys: {', '.join(map(str, data)) or 'none'}); write a list of objects or JSON Lines instead."
        )
    return data[lists[0]]


def _read_csv(path: Path) -> Records:
    rows, numbers = [], []
    with _open_text(path, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            header = reader.fieldnames or []  # read the header now, so line_num points past it
            start = reader.line_num + 1
            for row in reader:
                # DictReader puts surplus cells under the key None: a row with more cells than the header.
                if None in row:
                    raise DataError(
                        f"{path.name} line {start}: {len(row) - 1 + len(row[None])} cells but the header has "
                        f"{len(header)} columns; quote cells that contain commas."
                    )
                rows.append(dict(row))
                numbers.append(start)
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path.name} line {reader.line_num}: malformed CSV ({err}).") from None
    return Records(path, rows, "line", numbers)


def _read_parquet(path: Path) -> Records:
    require("pyarrow", purpose="reading Parquet files")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path.name}: not a readable Parquet file ({err}).") from None
    return Records(path, table.to_pylist(), "index")


def _read_saved_dataset(path: Path) -> Records:
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(
            f"{path} is a folder but not a `datasets` save_to_disk folder (no dataset_info.json or "
            f"dataset_dict.json); give a data file instead: {SUPPORTED}."
        )
    require("datasets", purpose="reading `datasets` folders")
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise DataError(
                f"{path} is a DatasetDict without a 'train' split (splits: {', '.join(dataset)}); "
                "save the split you want on its own, or name it 'train'."
            )
        dataset = dataset["train"]
    return Records(path, dataset.to_list(), "index")


def _open_text(path: Path, newline: str | None = None):
    # utf-8-sig drops a byte-order mark that Windows tools like to write at the start of CSV and JSON files.
    try:
        return path.open(encoding="utf-8-sig", newline=newline)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}).") from None
