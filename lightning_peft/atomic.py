"""Files and folders that appear whole or not at all: write into a hidden sibling, then rename it into place.

A rename within one filesystem is atomic, so a reader (or a crash) never sees a half-written adapter, merged
model, package, pull or registry version; a failure removes the staging folder and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lightning_peft.errors import ConfigError


def check_target(target: Path, *, overwrite: bool = False, option: str = "--to") -> None:
    """Refuse a target folder that exists with content, unless `overwrite`."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"`{option}` {target} exists and is not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"`{option}` {target} exists and is not empty; choose another folder or pass --overwrite.")


@contextlib.contextmanager
def staged_folder(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to `target`; on success it becomes `target`, on failure it is removed."""
    target = Path(target)
    check_target(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        _permissions_as_umask(staging)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _permissions_as_umask(folder: Path) -> None:
    # mkdtemp makes the folder private (0700) and some writers make files 0600; give them the usual modes.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def replace_folder(source: Path, target: Path) -> None:
    """Move `source` to `target` (same filesystem), replacing an existing `target` folder."""
    if not target.exists():
        os.rename(source, target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        os.rename(source, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(source, target)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> Path:
    """Write a whole file atomically: staged beside `path`, fsynced, renamed over it (readers see old or new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
    return path


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write: a crash can cut only the last line short, never one before it."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
