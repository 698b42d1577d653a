"""Reading the files a command is handed (JSON, safetensors, folders): one place, one kind of error.

A damaged, missing or unreadable file fails here with one line that names the file, what is wrong with it and
the fix, before a third-party loader (safetensors, PEFT, transformers) fails on it without naming it. Only files
are read: no torch import unless tensors are loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError, CorruptFileError, UnreadableFileError

REDO = "re-download or re-save it"
# A safetensors header larger than this is not a header (safetensors itself caps it at 100 MB).
_MAX_HEADER = 100_000_000


def check_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """`path` as a Path, after checking that it is a folder this process can list.

    Raises:
        ConfigError: `path` does not exist or is a file (a wrong argument: a usage error, as click makes it).
        UnreadableFileError: the folder cannot be listed (permissions).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} is not a folder: it does not exist; check the path.")
    if not path.is_dir():
        raise ConfigError(f"{what} {path} is not a folder: pass the folder that holds the files.")
    try:
        os.listdir(path)
    except OSError as err:
        raise _unreadable(path, err) from err
    return path


def read_bytes(path: str | os.PathLike, *, fix: str = REDO) -> bytes:
    """The contents of `path`; a missing or unreadable file raises one error naming it."""
    path = Path(path)
    with _reading(path, fix):
        return path.read_bytes()


def read_text(path: str | os.PathLike, *, fix: str = REDO) -> str:
    """The UTF-8 text of `path`; raises as `read_bytes`, and `CorruptFileError` for bytes that are not UTF-8."""
    raw = read_bytes(path, fix=fix)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{path} is damaged (not UTF-8 text, byte {err.start}): {fix}.") from err


def read_json(path: str | os.PathLike, *, fix: str = REDO) -> Any:
    """The parsed JSON of `path`.

    Raises:
        FileNotFoundError: `path` does not exist.
        CorruptFileError: not UTF-8 or not valid JSON (the message gives the line and column).
        UnreadableFileError: the file cannot be read (permissions).
    """
    text = read_text(path, fix=fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptFileError(
            f"{path} is damaged (invalid JSON: {err.msg} at line {err.lineno} column {err.colno}): {fix}."
        ) from err


def read_json_object(path: str | os.PathLike, *, fix: str = REDO) -> dict[str, Any]:
    """`read_json` for files that must hold a JSON object (configs, manifests)."""
    data = read_json(path, fix=fix)
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} is damaged (a JSON {type(data).__name__}, not an object): {fix}.")
    return data


def read_safetensors_header(path: str | os.PathLike, *, fix: str = REDO) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its tensor data starts (no torch needed).

    The header is checked against the file: every tensor must lie inside it, so a truncated file fails here.

    Raises:
        FileNotFoundError, UnreadableFileError: as `read_bytes`.
        CorruptFileError: the header is incomplete, not JSON, or names data past the end of the file.
    """
    path = Path(path)
    with _reading(path, fix), open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _damaged(path, f"{size} bytes, shorter than a safetensors header", fix)
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise _damaged(path, "incomplete safetensors header", fix)
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as err:
        raise _damaged(path, "the safetensors header is not valid JSON", fix) from err
    if not isinstance(header, dict):
        raise _damaged(path, "the safetensors header is not a JSON object", fix)
    _check_offsets(path, header, size - 8 - length, fix)
    return header, 8 + length


def _check_offsets(path: Path, header: dict[str, Any], data_size: int, fix: str) -> None:
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _damaged(path, f"tensor {name!r} has no valid data_offsets in the safetensors header", fix)
        if offsets[1] > data_size:
            raise _damaged(path, f"truncated: tensor {name!r} ends past the end of the file", fix)


def load_safetensors(path: str | os.PathLike, *, fix: str = REDO) -> dict[str, Any]:
    """Every tensor of a safetensors file (on the CPU), after `read_safetensors_header` checked the file."""
    from safetensors.torch import load_file

    read_safetensors_header(path, fix=fix)
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' SafetensorError names neither the file nor a fix
        raise _damaged(Path(path), str(err).splitlines()[0] if str(err) else type(err).__name__, fix) from err


def check_files(folder: str | os.PathLike, *, fix: str = REDO) -> None:
    """Check every JSON and safetensors file directly in `folder` (configs, tokenizer files, weights)."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix == ".json":
            read_json(path, fix=fix)
        elif path.suffix == ".safetensors":
            read_safetensors_header(path, fix=fix)


@contextlib.contextmanager
def _reading(path: Path, fix: str) -> Iterator[None]:
    """Turn the OSError of opening or reading `path` into an error that names it and the fix."""
    try:
        yield
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} does not exist: {fix}.") from err
    except IsADirectoryError as err:
        raise CorruptFileError(f"{path} is a folder, not a file: {fix}.") from err
    except UnreadableFileError:
        raise
    except OSError as err:
        raise _unreadable(path, err) from err


def _damaged(path: Path, reason: str, fix: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is damaged ({reason}): {fix}.")


def _unreadable(path: Path, err: OSError) -> UnreadableFileError:
    why = (err.strerror or type(err).__name__).lower()
    if isinstance(err, PermissionError):
        return UnreadableFileError(f"{path} cannot be read ({why}): give this user read access (chmod -R u+rX).")
    return UnreadableFileError(f"{path} cannot be read ({why}): check the disk, or copy the file again.")
