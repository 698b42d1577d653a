"""The package manifest, `lpeft_manifest.json`: what a published adapter is, made of, and was trained on.

It is canonical JSON (sorted keys, two-space indent, a final newline), so the same package always gives the
same bytes; only `created_at` changes between two packagings of the same inputs (and not even that when
`SOURCE_DATE_EPOCH` is set). It lists every other file of the package with its sha256 and size — not itself.

Top-level keys: format, format_version, name, version, parent_version, created_at, message, license,
base_model {id, revision, fingerprint, fingerprint_method, weights and alias (null, or what the weights are when
not the id's own files, and the built-in alias that loads them)}, adapter {method, task_type, hyperparameters},
files [{path, sha256, size}], training {summary, hyperparameters, sources}, evaluation {metric: value},
datasets {hub, files}, libraries {package: version}, serving {vllm_compatible, problems, notes}, history
(the versions published before this one, newest first).
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from lightning_peft.errors import CorruptFileError, DataError
from lightning_peft.hub.fingerprint import file_sha256

MANIFEST_FILE = "lpeft_manifest.json"
FORMAT = "lightning-peft/adapter-package"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = ("format", "format_version", "name", "version", "base_model", "files")


def dumps(data: dict[str, Any]) -> bytes:
    """Canonical JSON bytes."""
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def file_entries(folder: Path, paths: list[str]) -> list[dict[str, Any]]:
    """`{path, sha256, size}` for each file of `folder`, sorted by path."""
    return [{"path": p, "sha256": file_sha256(folder / p), "size": (folder / p).stat().st_size} for p in sorted(paths)]


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


def parse(raw: bytes, *, where: str) -> dict[str, Any]:
    """Parse and check a manifest read from a registry or a folder.

    Raises:
        DataError: malformed JSON, a missing key, a bad checksum entry, or a path that escapes the folder.
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
    return data


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


def verify_files(folder: Path, manifest: dict[str, Any], *, where: str) -> None:
    """Check every listed file's size and sha256 in `folder`.

    Raises:
        DataError: the first file that is missing or differs, with expected and actual values.
    """
    for problem in file_problems(folder, manifest):
        raise DataError(f"{where}: {problem}; nothing was written.")


def file_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """One line per listed file that is missing or does not match its size and sha256."""
    problems = []
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"file {entry['path']!r} is missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"file {entry['path']!r} has {size} bytes, the manifest says {entry['size']}")
            continue
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            problems.append(
                f"file {entry['path']!r} fails its checksum (sha256 {digest[:12]}…, expected {entry['sha256'][:12]}…)"
            )
    return problems
