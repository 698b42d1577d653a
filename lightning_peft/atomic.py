"""Files and folders that appear whole or not at all: write into a hidden sibling, fsync, then rename it into place.

A rename within one filesystem is atomic, so a reader (or a crash) never sees a half-written adapter, merged
model, package, pull, registry index, cache entry or run file; a failure removes the staging file or folder and
leaves the target as it was. What appears has the usual permissions (0o666 / 0o777 less the umask), never the
private 0600 / 0700 of `tempfile.mkstemp` / `mkdtemp`: a shared registry or output folder stays readable to a team.

Staging names are `.NAME.partial-TOKEN` (and `.NAME.old-TOKEN` for a replaced folder while it is swapped out), so
`callbacks/checkpoint_folder.py` can recognise and clean up what an interrupted write left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from lightning_peft.errors import ConfigError

# ---- files -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path beside `path` for a writer that wants a file name (e.g. `safetensors.save_file`);
    on success it is fsynced, given the usual mode and renamed over `path`; on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_name(path, "partial")
    try:
        yield staging
        fsync_file(staging)
        staging.chmod(0o666 & ~current_umask())
        os.replace(staging, path)
        fsync_dir(path.parent)
    finally:
        staging.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a whole UTF-8 text file atomically (readers see the old file or the new one, never a part)."""
    with staged_file(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a whole binary file atomically (see `write_text`)."""
    with staged_file(path) as staging:
        staging.write_bytes(data)
    return Path(path)


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write: a crash can cut only the last line short, never one before it."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")


# ---- folders -----------------------------------------------------------------------------------------------


def check_target(target: Path, *, overwrite: bool = False, option: str = "--to") -> None:
    """Refuse a target folder that exists with content, unless `overwrite`."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"`{option}` {target} exists and is not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"`{option}` {target} exists and is not empty; choose another folder or pass --overwrite.")


@contextlib.contextmanager
def staged_folder(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to `target`; on success it is fsynced and becomes `target` (replacing
    it when `overwrite`), on failure it is removed."""
    target = Path(target)
    check_target(target, overwrite=overwrite)
    staging = staging_folder(target)
    try:
        yield staging
        _permissions_as_umask(staging)
        fsync_tree(staging)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staging_folder(target: Path) -> Path:
    """A new empty hidden folder beside `target` (same filesystem), with the umask's permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_name(target, "partial")
    staging.mkdir()
    return staging


def replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target` (same filesystem), replacing an existing `target` folder or link.

    The old `target` is renamed aside to `.NAME.old-TOKEN` first and deleted after: a stop between the two renames
    leaves it there, whole, for `callbacks/checkpoint_folder.py` to put back.
    """
    if not os.path.lexists(target):
        os.rename(source, target)
    else:
        old = staging_name(target, "old")
        os.rename(target, old)
        os.rename(source, target)
        fsync_dir(target.parent)
        remove(old)
    fsync_dir(target.parent)


def staging_name(target: Path, kind: str) -> Path:
    """`.NAME.KIND-TOKEN` beside `target`: hidden, unique, and recognisable as ours."""
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder tree, if it is there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _permissions_as_umask(folder: Path) -> None:
    # Some writers make files 0600 (mkstemp inside libraries); give everything the usual modes.
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# ---- durability --------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (so a rename after it never publishes an empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames into it) to the disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # rename is still atomic there
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below `folder`, then every folder, deepest first."""
    paths = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in paths:
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
    for path in [*(p for p in paths if p.is_dir() and not p.is_symlink()), folder]:
        fsync_dir(path)
