"""The base model an adapter belongs to: where it is on disk, its Hub id, and a fingerprint of its weights.

The fingerprint (`lpeft-base-v1`) is a sha256 over
  1. the model's `config.json`, parsed and dumped canonically (sorted keys, no whitespace) without the keys
     that change when the same weights are saved again (`_name_or_path`, `transformers_version`, `dtype`,
     `torch_dtype`, `use_cache`, `_commit_hash`), then
  2. every tensor of every `*.safetensors` file, in name order: its name, dtype and shape, then its raw bytes.
So it names the architecture and the exact weights, whatever the sharding, file names or safetensors
metadata — and it is computed without torch, by reading the safetensors header and streaming the data.

Hashing a large base takes a while, so results are cached in `<cache>/fingerprints/` (`$LPEFT_CACHE`, else
`$XDG_CACHE_HOME/lightning_peft`), keyed by the canonical config and each weight file's resolved path, size,
mtime and inode: rewriting or replacing a weight file changes the key, so it is hashed again. Hashing shows a
progress bar over bytes (on a terminal) and logs a line for bases over 256 MiB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lightning_peft.errors import ConfigError, DataError
from lightning_peft.files import read_json_object, read_safetensors_header

log = logging.getLogger(__name__)

FINGERPRINT_METHOD = "lpeft-base-v1"
_ANNOUNCE_BYTES = 256 * 1024 * 1024
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "_commit_hash"}
)
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class BaseModel:
    """A base model found on disk.

    Attributes:
        path: The local folder holding config.json and the safetensors weights.
        hub_id: Its Hugging Face Hub id when known (None for a folder of unknown origin).
        revision: The Hub commit of those files when known (a Hub cache snapshot).
        weights: What the weights are when they are not the Hub id's own files (a built-in alias's GGUF build).
        alias: The built-in alias that loads exactly these weights, if the base is one.
    """

    path: Path
    hub_id: str | None
    revision: str | None = None
    weights: str | None = None
    alias: str | None = None


def locate_base(name_or_path: str, *, hub_id: str | None = None) -> BaseModel:
    """Find a base model on disk from an alias, a folder, or a Hub id already in the local Hub cache.

    Args:
        name_or_path: What `adapter_config.json` or `--base` names.
        hub_id: The Hub id to record, overriding what can be inferred (aliases map to their source).

    Raises:
        ConfigError: the model is not on this machine.
    """
    from lightning_peft.models import alias_for, hub_id_for, recorded_base_source, resolve_model

    resolved = resolve_model(recorded_base_source(name_or_path))
    if Path(resolved).is_dir():
        alias = alias_for(resolved)
        return BaseModel(
            Path(resolved),
            hub_id or hub_id_for(name_or_path) or _hub_id_of_cache_path(resolved),
            weights=alias.weights_note if alias else None,
            alias=alias.name if alias else None,
        )
    snapshot = _cached_snapshot(resolved)
    if snapshot is None:
        raise ConfigError(
            f"The base model {name_or_path!r} is not on this machine (neither a folder, an alias, nor in the Hub "
            "cache); pass `--base PATH_OR_ALIAS` pointing at its files."
        )
    return BaseModel(snapshot, hub_id or resolved, revision=snapshot.name)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of a Hub model already downloaded to the local cache, without any network access."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid id: both mean "not here"
        return None


def _hub_id_of_cache_path(path: str) -> str | None:
    """`org/name` for a folder inside the Hub cache (…/models--org--name/snapshots/<sha>)."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def fingerprint(model_dir: str | os.PathLike) -> str:
    """The `sha256:<hex>` fingerprint of the base model in `model_dir` (see the module docstring).

    Raises:
        ConfigError: no config.json or no safetensors weights (pickle weights are never read).
        DataError: a malformed safetensors file.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{model_dir} has no config.json, so it is not a model folder to fingerprint.")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ConfigError(
            f"{model_dir} has no *.safetensors weights; the base fingerprint reads safetensors only "
            "(pickle .bin weights are never loaded). Convert the model with `save_pretrained(..., safe_serialization=True)`."
        )
    config = canonical_config(config_path)
    cached = _cache_path(config, weights)
    if cached.is_file():
        recorded = cached.read_text(encoding="utf-8").strip()
        if recorded.startswith("sha256:"):
            return recorded
    result = _compute(config, weights, model_dir)
    _remember(cached, result)
    return result


def _compute(config: bytes, weights: list[Path], model_dir: Path) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    digest.update(config)
    tensors = _tensor_index(weights)
    total = sum(end - start for _, start, end, _, _ in tensors.values())
    if total >= _ANNOUNCE_BYTES:
        log.info("Fingerprinting the base model in %s (%.1f GiB of weights)", model_dir, total / 2**30)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Fingerprinting the base", disable=None, leave=False) as bar:
        for name in sorted(tensors):
            path, start, end, dtype, shape = tensors[name]
            digest.update(json.dumps([name, dtype, shape]).encode())
            _hash_range(digest, path, start, end)
            bar.update(end - start)
    return f"sha256:{digest.hexdigest()}"


def _cache_path(config: bytes, weights: list[Path]) -> Path:
    """The cache entry for this config and these weight files as they are now (path, size, mtime, inode)."""
    from lightning_peft.models import cache_root

    key = hashlib.sha256(FINGERPRINT_METHOD.encode() + b"\0" + config)
    for path in weights:
        stat = path.stat()
        key.update(json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]).encode())
    return cache_root() / "fingerprints" / f"{key.hexdigest()}.txt"


def _remember(cached: Path, result: str) -> None:
    """Cache a fingerprint; a cache that cannot be written only costs the next call the hashing."""
    from lightning_peft.atomic import write_text

    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_text(cached, result + "\n")
    except OSError as err:
        log.debug("Fingerprint cache not written (%s)", err)


def canonical_config(config_path: Path) -> bytes:
    """config.json as canonical JSON without the keys that change when the same weights are saved again."""
    config = read_json_object(config_path)
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()


def _tensor_index(weights: list[Path]) -> dict[str, tuple[Path, int, int, str, list[int]]]:
    """name → (file, absolute start, end, dtype, shape) over every safetensors file."""
    index: dict[str, tuple[Path, int, int, str, list[int]]] = {}
    for path in weights:
        header, data_start = read_safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in index:
                raise DataError(f"Tensor {name!r} appears in both {index[name][0].name} and {path.name}.")
            begin, end = info["data_offsets"]
            index[name] = (path, data_start + begin, data_start + end, info["dtype"], list(info["shape"]))
    return index


def _hash_range(digest: hashlib._Hash, path: Path, start: int, end: int) -> None:
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                raise DataError(f"{path} is truncated: a tensor ends past the end of the file.")
            digest.update(chunk)
            remaining -= len(chunk)


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
