"""The on-disk cache of tokenized data, so a second run (and every DDP rank after the first) skips tokenizing.

An entry is one safetensors file of flat integer arrays (never a pickle, see `token_file.py`) named by the sha256
of everything that changes the result: the data bytes (for a Hub data set: its id, subset, split, revision, commit
and fingerprint), the format settings, the tokenizer and `CACHE_VERSION`. Entries are written chunk by chunk to a
temporary file and renamed, so a crash never leaves half a file, and a file lock lets one process tokenize while
the others wait for its result. Entries are opened memory-mapped: a warm start reads the index, not the tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lightning_peft import atomic
from lightning_peft.data import token_file
from lightning_peft.data.readers import require_exists
from lightning_peft.data.tokenized import TokenizedData

log = logging.getLogger(__name__)

# Bump whenever the arrays or the labelling rules change, so old entries are no longer found.
# 2: uint16 token ids, a packed loss mask instead of labels, written in chunks and memory-mapped.
CACHE_VERSION = 2


def cache_dir() -> Path:
    """`$LPEFT_DATA_CACHE`, else the `data` folder under `lightning_peft.models.cache_root()`."""
    if os.environ.get("LPEFT_DATA_CACHE"):
        return Path(os.environ["LPEFT_DATA_CACHE"])
    from lightning_peft.models import cache_root

    return cache_root() / "data"


def cached(
    path: str | Path,
    settings: Mapping[str, Any],
    tokenizer: Any,
    build: Callable[[], Iterable[TokenizedData]],
    digest: str | None = None,
) -> TokenizedData:
    """The cached result for these inputs, or the concatenation of the parts `build()` yields, stored for the next
    run and opened memory-mapped (the parts are written as they come: they need not fit in memory together).

    `digest` identifies data that is not a local file (a Hub data set: see `hub_datasets.HubData.digest`); `path`
    then only names it in the logs.
    """
    from filelock import FileLock

    target = cache_dir() / f"{cache_key(path, settings, tokenizer, digest)}.safetensors"
    data = _load(target)
    if data is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        # DDP ranks run setup together: the first one tokenizes, the others then find its file.
        with FileLock(str(target) + ".lock"):
            data = _load(target)
            if data is None:
                _save(target, build())
                log.debug("Cached the tokenized %s in %s", Path(path).name, target)
                data = _load(target)
                if data is None:
                    raise OSError(f"The data cache entry {target} just written cannot be read back.")
                return data
    log.debug("Loaded the tokenized %s from the cache (%s)", Path(path).name, target)
    data.from_cache = True
    return data


def cached_arrays(
    name: str, build: Callable[[], dict[str, np.ndarray]], check: Callable[[dict[str, np.ndarray]], None]
) -> dict[str, np.ndarray]:
    """Small derived arrays kept in the cache folder under `name` (a safetensors file): read back when `check`
    accepts them, else built, stored atomically and returned. A read-only cache folder only costs the rebuild."""
    from safetensors.numpy import load_file, save_file

    target = cache_dir() / name
    if target.exists():
        try:
            arrays = load_file(target)
            check(arrays)
            return arrays
        except Exception as err:  # a damaged entry is rebuilt rather than trusted
            log.warning("Ignoring the unreadable cache entry %s (%s); computing it again.", target, err)
    arrays = build()
    try:
        with atomic.staged_file(target) as staging:
            save_file(arrays, str(staging))
    except OSError as err:
        log.debug("Could not keep %s in the cache (%s)", target, err)
    return arrays


def cache_key(path: str | Path, settings: Mapping[str, Any], tokenizer: Any, source: str | None = None) -> str:
    """sha256 over the data (its bytes, or the `source` digest given), the settings, the tokenizer and the version."""
    digest = hashlib.sha256()
    digest.update(f"lightning-peft data cache v{CACHE_VERSION}\0".encode())
    digest.update((source or source_digest(path)).encode())
    digest.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()


def source_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of every file (relative name and bytes) in a `datasets` folder.

    Hashing a data set of millions of rows takes seconds at every start, so the digest is remembered with the
    files' stat (size, modification and change times, inode): it is reused while that is unchanged, as git and
    make trust a file's stat. The change time cannot be set back by tools that keep the modification time
    (`cp -p`, `rsync -t`), and files modified within `_RACY_SECONDS` of being hashed are not remembered (a write
    in the same clock tick could leave the stat as it was).
    """
    path = require_exists(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    memo = _digest_memo(path)
    stamp = _stamp(path, files)
    remembered = _read_json(memo)
    if remembered.get("stamp") == stamp and isinstance(remembered.get("sha256"), str):
        return remembered["sha256"]
    hashed_at = time.time()
    digest = _sha256_of_files(path, files)
    newest = max((entry[2] for entry in stamp), default=0) / 1e9  # the latest change time
    if newest < hashed_at - _RACY_SECONDS and _stamp(path, files) == stamp:
        try:
            atomic.write_text(memo, json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}))
        except OSError as err:  # a read-only cache still works; it hashes at every start
            log.debug("Could not remember the digest of %s (%s)", path, err)
    return digest


# A file changed this recently may change again within the clock tick of its recorded stat: hash it every time.
_RACY_SECONDS = 2.0


def _sha256_of_files(path: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path, files: list[Path]) -> list[list]:
    """Each file's relative name, size, change and modification times (ns), inode and device."""
    stamp = []
    for file in files:
        stat = file.stat()
        name = file.relative_to(path).as_posix() if path.is_dir() else ""
        stamp.append([name, stat.st_size, stat.st_ctime_ns, stat.st_mtime_ns, stat.st_ino, stat.st_dev])
    return stamp


def _digest_memo(path: Path) -> Path:
    """Where the digest of the data at `path` is remembered (one small JSON file per absolute path)."""
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()
    return cache_dir() / "digests" / f"{name}.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the tokens: vocabulary and pipeline, chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        # The backend JSON holds the vocabulary, merges, normalizer, pre-tokenizer and post-processor (BOS/EOS).
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
        "added_tokens": {i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _save(target: Path, parts: Iterable[TokenizedData]) -> None:
    with atomic.staged_file(target) as staging:
        token_file.write(staging, parts, {"version": str(CACHE_VERSION)})


def _load(target: Path) -> TokenizedData | None:
    if not target.exists():
        return None
    try:
        data, metadata = token_file.read(target)
        if metadata.get("version") != str(CACHE_VERSION):
            raise ValueError(f"version {metadata.get('version')}, expected {CACHE_VERSION}")
        return data
    except Exception as err:  # a damaged entry is rebuilt rather than trusted
        log.warning("Ignoring the unreadable data cache entry %s (%s); tokenizing again.", target, err)
        return None
