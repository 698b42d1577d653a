"""The package manifest, `lpeft_manifest.json`: what a published adapter is, made of, and was trained on.

It is canonical JSON (sorted keys, two-space indent, a final newline), so the same package always gives the
same bytes; only `created_at` changes between two packagings of the same inputs (and not even that when
`SOURCE_DATE_EPOCH` is set). It lists every other file of the package with its sha256 and size — not itself.

The schema is the `Manifest` dataclass below (its fields are the JSON keys); `format_version` is its version,
raised when a change would mislead an older reader. `parse`/`read` check a manifest field by field and `write`
(or `Manifest.to_bytes`) writes one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Union, get_args, get_origin, get_type_hints

from lightning_peft.errors import CorruptFileError, DataError
from lightning_peft.files import read_bytes
from lightning_peft.hub.fingerprint import file_sha256

MANIFEST_FILE = "lpeft_manifest.json"
FORMAT = "lightning-peft/adapter-package"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What makes a JSON object a lightning-peft manifest at all, checked before the format and then every field.
_REQUIRED = ("format", "format_version", "name", "version", "base_model", "files")


@dataclass(frozen=True)
class FileEntry:
    """A file of the package (any but the manifest itself)."""

    path: str  # relative, POSIX, inside the package folder
    sha256: str
    size: int


@dataclass(frozen=True)
class BaseModelInfo:
    """The base model the adapter was trained on."""

    id: str | None  # its Hub id; None for a local folder with no known id
    revision: str | None
    fingerprint: str  # sha256 over its config and every weight tensor (see fingerprint.py)
    fingerprint_method: str
    weights: str | None = None  # what the weights are when not the id's own files (an alias's GGUF build)
    alias: str | None = None  # the built-in alias that loads those weights


@dataclass(frozen=True)
class AdapterInfo:
    """The PEFT method and its settings, from adapter_config.json."""

    method: str  # PEFT's peft_type: LORA, IA3 ...
    task_type: str | None
    peft_version: str | None
    hyperparameters: dict[str, Any]
    parameters: int | None  # trainable parameter count; None for pickle weights (never unpickled)


@dataclass(frozen=True)
class TrainingInfo:
    """What the run's files recorded (see runinfo.py); unknown values are None."""

    summary: dict[str, Any]  # steps, tokens, duration_s, hardware, final_train_loss, final_val_loss
    hyperparameters: dict[str, Any]
    sources: tuple[str, ...]  # the run files read


@dataclass(frozen=True)
class HubSource:
    """A Hub data set the run read, as the run resolved it (`run_summary.json`'s `data`)."""

    role: str  # train, validation or test
    id: str
    subset: str | None
    split: str | None
    revision: str | None


@dataclass(frozen=True)
class DatasetsInfo:
    hub: tuple[str, ...]  # Hub data set ids: given at publish time (--dataset), then those the run read
    files: dict[str, str]  # local data file names by role: train, validation, test (", "-joined for a mixture)
    hub_sources: tuple[HubSource, ...] = ()  # the Hub data sets the run read, by role (absent in older packages)


@dataclass(frozen=True)
class HarnessScore:
    """An lm-evaluation-harness score of the run (LmEvalCallback): the base before training, the adapter after."""

    task: str
    metric: str
    filter: str
    higher_is_better: bool | None
    base: float | None
    adapter: float | None
    dataset: str | None  # the task's `dataset_path`: a Hub data set id, or a loader (json ...) for local data
    dataset_config: str | None
    split: str | None


@dataclass(frozen=True)
class ServingInfo:
    """The serving lint (lint.py): whether vLLM can load the adapter, and why not."""

    vllm_compatible: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    max_lora_rank: int | None


@dataclass(frozen=True)
class Manifest:
    """The typed manifest; `to_dict` gives its JSON object, `from_dict` checks and reads one."""

    format: str
    format_version: int
    name: str  # org/name
    version: str  # semver
    parent_version: str | None
    created_at: str
    message: str
    license: str | None
    base_model: BaseModelInfo
    adapter: AdapterInfo
    files: tuple[FileEntry, ...]
    training: TrainingInfo
    evaluation: dict[str, float]  # the last value of each val_* / test_* metric
    datasets: DatasetsInfo
    libraries: dict[str, str]  # package: version
    serving: ServingInfo
    history: tuple[str, ...] = field(default=())  # the versions published before this one, newest first
    harness: tuple[HarnessScore, ...] = field(default=())  # harness scores recorded by the run (absent before)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes."""
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> Manifest:
        """Read a manifest's JSON object, checking every field's type.

        Raises:
            DataError: one line naming `where`, the manifest file and the first field missing or of the wrong type.
        """
        return _read_dataclass(cls, data, where, "")


def dumps(data: dict[str, Any]) -> bytes:
    """Canonical JSON bytes."""
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def file_entries(folder: Path, paths: list[str]) -> tuple[FileEntry, ...]:
    """A `FileEntry` for each file of `folder`, sorted by path."""
    return tuple(FileEntry(p, file_sha256(folder / p), (folder / p).stat().st_size) for p in sorted(paths))


def check_relative_path(path: Any, *, where: str) -> str:
    """A manifest path must stay inside the package: relative, POSIX, without `..` or a drive.

    Raises:
        DataError: naming the path and where it came from.
    """
    if not isinstance(path, str) or not path:
        raise DataError(f"{where}: file path {path!r} is not a non-empty string.")
    pure = PurePosixPath(path)
    if (
        "\\" in path
        or ":" in path
        or pure.is_absolute()
        or ".." in pure.parts
        or str(pure) != path
        or "." in pure.parts
    ):
        raise DataError(f"{where}: file path {path!r} escapes the package folder or is not a plain relative path.")
    return path


def write(folder: Path, manifest: Manifest) -> None:
    """Write `manifest` as `folder/lpeft_manifest.json` (into a folder being staged)."""
    (Path(folder) / MANIFEST_FILE).write_bytes(manifest.to_bytes())


def read(folder: Path) -> Manifest:
    """The checked manifest of a package folder.

    Raises:
        DataError: see `parse`.
    """
    return parse(read_bytes(Path(folder) / MANIFEST_FILE), where=str(folder))


def parse(raw: bytes, *, where: str) -> Manifest:
    """Parse and check a manifest read from a registry or a folder.

    Raises:
        DataError: malformed JSON, a missing or wrong-typed field, a bad checksum entry, or a path that escapes
            the folder.
    """
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptFileError(
            f"{where}: {MANIFEST_FILE} is damaged (invalid JSON: {err}): publish this version again, or use another."
        ) from err
    if not isinstance(data, dict):
        raise CorruptFileError(f"{where}: {MANIFEST_FILE} is damaged (not a JSON object): publish this version again.")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise DataError(f"{where}: the manifest lacks {', '.join(missing)}; it was not written by lightning-peft.")
    if (
        data["format"] != FORMAT
        or not isinstance(data["format_version"], int)
        or data["format_version"] > FORMAT_VERSION
    ):
        raise DataError(
            f"{where}: manifest format {data['format']!r} v{data['format_version']} is not one this lightning-peft "
            f"reads ({FORMAT} v{FORMAT_VERSION}); upgrade lightning-peft."
        )
    _check_files(data["files"], where)
    return Manifest.from_dict(data, where=where)


def _check_files(files: Any, where: str) -> None:
    if not isinstance(files, list) or not files:
        raise DataError(f"{where}: the manifest's `files` must be a non-empty list.")
    seen = set()
    for entry in files:
        if not isinstance(entry, dict):
            raise DataError(f"{where}: every entry of `files` must be an object with path, sha256 and size.")
        path = check_relative_path(entry.get("path"), where=where)
        if path == MANIFEST_FILE:
            raise DataError(f"{where}: the manifest must not list itself.")
        if path.lower() in seen:
            raise DataError(f"{where}: file {path!r} is listed twice.")
        seen.add(path.lower())
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise DataError(f"{where}: file {path!r} has no valid sha256 ({entry.get('sha256')!r}).")
        if not isinstance(entry.get("size"), int) or entry["size"] < 0:
            raise DataError(f"{where}: file {path!r} has no valid size ({entry.get('size')!r}).")


def verify_files(folder: Path, manifest: Manifest, *, where: str) -> None:
    """Check every listed file's size and sha256 in `folder`.

    Raises:
        DataError: the first file that is missing or differs, with expected and actual values.
    """
    for problem in file_problems(folder, manifest):
        raise DataError(f"{where}: {problem}; nothing was written.")


def file_problems(folder: Path, manifest: Manifest) -> list[str]:
    """One line per listed file that is missing or does not match its size and sha256."""
    problems = []
    for entry in manifest.files:
        path = folder / entry.path
        if not path.is_file():
            problems.append(f"file {entry.path!r} is missing")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"file {entry.path!r} has {size} bytes, the manifest says {entry.size}")
            continue
        digest = file_sha256(path)
        if digest != entry.sha256:
            problems.append(
                f"file {entry.path!r} fails its checksum (sha256 {digest[:12]}…, expected {entry.sha256[:12]}…)"
            )
    return problems


def harness_score(record: dict[str, Any], *, where: str) -> HarnessScore:
    """A `HarnessScore` from a run's `lm_eval.json` record, every field type-checked (a missing one is None)."""
    names = [spec.name for spec in dataclasses.fields(HarnessScore)]
    return _read_dataclass(HarnessScore, {name: record.get(name) for name in names}, where, "harness")


# ---- reading the JSON object into the dataclasses, by their annotations ------------------------------------------

_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _read_dataclass(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, dict):
        raise _wrong(where, path or "(top level)", "an object", data)
    hints = get_type_hints(cls)
    values = {}
    for spec in dataclasses.fields(cls):
        key = f"{path}.{spec.name}" if path else spec.name
        if spec.name in data:
            values[spec.name] = _read_value(hints[spec.name], data[spec.name], where, key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise DataError(f"{where}: {MANIFEST_FILE} has no `{key}`; the manifest is incomplete or damaged.")
    return cls(**values)


def _read_value(hint: Any, value: Any, where: str, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _read_dataclass(hint, value, where, key)
    if origin in (Union, types.UnionType):  # `X | None`
        if value is None:
            return None
        return _read_value(next(a for a in args if a is not type(None)), value, where, key)
    if origin is tuple:  # `tuple[X, ...]`, a JSON list
        if not isinstance(value, list):
            raise _wrong(where, key, "a list", value)
        return tuple(_read_value(args[0], item, where, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:  # `dict[str, X]`, a JSON object
        if not isinstance(value, dict):
            raise _wrong(where, key, "an object", value)
        return {name: _read_value(args[1], item, where, f"{key}.{name}") for name, item in value.items()}
    if not _is_instance(value, hint):
        raise _wrong(where, key, _KINDS[hint], value)
    return value


def _is_instance(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _wrong(where: str, key: str, expected: str, value: Any) -> DataError:
    shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
    return DataError(f"{where}: {MANIFEST_FILE} field `{key}` must be {expected}, not {shown}.")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
