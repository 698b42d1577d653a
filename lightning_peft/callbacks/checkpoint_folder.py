"""The on-disk format of an `AdapterCheckpoint` folder and the atomic file-system steps that write it.

A checkpoint folder holds:

- `adapter_config.json`, `adapter_model.safetensors` (and PEFT's `README.md`): the adapter as PEFT saves it, so
  `PeftModel.from_pretrained(base, folder)` loads it. It is the only copy of the adapter weights.
- `trainer_state.ckpt`: Lightning's checkpoint dict (`dump_checkpoint`: optimizer, LR schedulers, loop progress,
  the data position saved by stateful loaders, callback states, hyperparameters) without the weights, plus the
  RNG states (torch, CUDA, numpy, python) of every rank and a map from the module's state-dict keys to the keys of
  the adapter file. Frozen base weights are never in it. Float32 optimizer tensors are stored losslessly with
  their sign/exponent bytes compressed (about 15% smaller: what keeps a LoRA checkpoint under 10% of the base). Everything loads with `torch.load(weights_only=True)`.
- `lpeft_checkpoint.json`, written last: step, epoch, time and the size of every file. A folder is complete
  only with it and with every file at its size.

Atomic writes: see `adapter_checkpoint.py` ("Atomicity").
"""

from __future__ import annotations

import bz2
import contextlib
import json
import os
import pickle
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_peft import atomic
from lightning_peft.adapters import save_options
from lightning_peft.errors import ConfigError, CorruptFileError
from lightning_peft.files import check_folder, load_safetensors, read_json_object

STATE_FILE = "trainer_state.ckpt"
MARKER_FILE = "lpeft_checkpoint.json"
FORMAT_VERSION = 1
_PACKED = "lpeft_packed_float32"
# The byte of a float32 holding its sign and 7 of its 8 exponent bits: the only one that compresses.
_HIGH_BYTE = 3 if sys.byteorder == "little" else 0
_CODEC = bz2


# ---- the folder format ---------------------------------------------------------------------------------------


def find_peft_model(pl_module: torch.nn.Module) -> tuple[str, Any]:
    """(state-dict prefix, model) of the `peft.PeftModel` inside `pl_module` (its `model` attribute, or the first)."""
    from peft import PeftModel

    if isinstance(getattr(pl_module, "model", None), PeftModel):
        return "model.", pl_module.model
    for name, module in pl_module.named_modules():
        if isinstance(module, PeftModel):
            return f"{name}." if name else "", module
    raise ConfigError(
        f"AdapterCheckpoint needs a LightningModule holding a peft.PeftModel; {type(pl_module).__name__} has none "
        "(use PeftCausalLM, or Lightning's ModelCheckpoint for other models)."
    )


def write_checkpoint(
    target: Path,
    checkpoint: dict[str, Any],
    peft_model: Any,
    prefix: str,
    adapter_keys: set[str],
    compress: bool = True,
) -> Path:
    """Write `checkpoint` (a Lightning checkpoint dict) as a checkpoint folder at `target`, atomically."""
    from peft.utils import get_peft_model_state_dict

    state = dict(checkpoint)
    module_state = state.pop("state_dict", {})
    # Only adapter tensors of the PEFT model (never its frozen base) and the module's own tensors outside it.
    peft_state = {k[len(prefix) :]: v for k, v in module_state.items() if k.startswith(prefix) and k in adapter_keys}
    outside = {k: v for k, v in module_state.items() if not k.startswith(prefix)}
    adapter = peft_model.active_adapter
    options = save_options(peft_model)
    saved = get_peft_model_state_dict(peft_model, state_dict=peft_state, adapter_name=adapter, **options)
    # PEFT renames tensors (drops the adapter name) but passes most through: map those by identity. Tensors it
    # transforms (prompt embeddings, AdaLoRA's resized ranks) stay in the state file under their own keys.
    key_of = {id(value): prefix + key for key, value in peft_state.items()}
    state["adapter_state_keys"] = {key_of[id(v)]: k for k, v in saved.items() if id(v) in key_of}
    mapped = set(state["adapter_state_keys"])
    state["state_dict"] = {**outside, **{prefix + k: v for k, v in peft_state.items() if prefix + k not in mapped}}
    state["adapter_file"] = ("" if adapter == "default" else f"{adapter}/") + "adapter_model.safetensors"
    if compress and "optimizer_states" in state:
        state["optimizer_states"] = _map_tensors(state["optimizer_states"], _pack)

    staging = atomic.staging_folder(target)
    try:
        peft_model.save_pretrained(
            staging, state_dict=peft_state, safe_serialization=True, selected_adapters=[adapter], **options
        )
        torch.save(state, staging / STATE_FILE)
        _write_marker(staging, checkpoint)
        atomic.fsync_dir(staging)
        atomic.replace_folder(staging, target)  # a stop between its two renames is rolled back by _roll_back
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """The Lightning checkpoint dict of a checkpoint folder, with `state_dict` rebuilt from the adapter file."""
    folder = check_folder(folder, "Checkpoint folder")
    if not is_complete(folder):
        raise ConfigError(
            f"{folder} is not a complete AdapterCheckpoint folder ({MARKER_FILE} is missing or a file is short): it "
            "was still being written when its run stopped. Resume from another checkpoint, e.g. ckpt_path='last'."
        )
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:  # torch's errors name no file
        raise CorruptFileError(
            f"{folder / STATE_FILE} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}): "
            "resume from another checkpoint, e.g. ckpt_path='last'."
        ) from err
    if "optimizer_states" in state:
        state["optimizer_states"] = _map_tensors(state["optimizer_states"], None)
    keys = state.pop("adapter_state_keys", {})
    adapter_file = folder / state.pop("adapter_file", "adapter_model.safetensors")
    if keys:
        tensors = load_safetensors(adapter_file, fix="resume from another checkpoint, e.g. ckpt_path='last'")
        missing = sorted(set(keys.values()) - set(tensors))
        if missing:
            raise ConfigError(f"{adapter_file} lacks the adapter tensors {missing[:5]}: the checkpoint was altered.")
        state["state_dict"].update({module_key: tensors[key] for module_key, key in keys.items()})
    return state


def is_checkpoint_folder(path: Any) -> bool:
    """Whether `path` is a folder written by `AdapterCheckpoint` (complete or not)."""
    try:
        path = Path(path)
    except TypeError:
        return False
    return path.is_dir() and ((path / MARKER_FILE).exists() or (path / STATE_FILE).exists())


def is_complete(folder: str | os.PathLike) -> bool:
    """A checkpoint folder whose marker was written and whose every file has the size the marker records."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        files = marker["files"]
        return bool(files) and all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def checkpoint_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The marker of a complete checkpoint folder: `global_step`, `epoch`, `saved_at_ns`, `files`."""
    return read_json_object(Path(folder) / MARKER_FILE)


def newest_checkpoint(directories: Iterable[str | os.PathLike]) -> Path | None:
    """The most recently written complete checkpoint folder in `directories` (interrupted replacements rolled back)."""
    found = []
    for directory in map(Path, directories):
        if not directory.is_dir():
            continue
        _roll_back(directory)
        for entry in directory.iterdir():
            if not entry.name.startswith(".") and entry.is_dir() and is_complete(entry):
                info = checkpoint_info(entry)
                # Same save time (a `last` link and its target): prefer the real folder.
                found.append((info["saved_at_ns"], info["global_step"], not entry.is_symlink(), str(entry)))
    return Path(max(found)[3]) if found else None


def clean_up(directory: Path) -> None:
    """Roll back interrupted replacements and delete what interrupted writes and deletions left behind."""
    if not directory.is_dir():
        return
    _roll_back(directory)
    for entry in directory.iterdir():
        name, kind = _hidden_parts(entry.name)
        if kind in ("partial", "deleting", "link") or (kind == "old" and (directory / name).exists()):
            atomic.remove(entry)


def remove_folder(folder: Path) -> None:
    """Delete a checkpoint folder (or link) so that no half-deleted folder is ever visible under its name."""
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        trash = atomic.staging_name(folder, "deleting")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def link_folder(source: Path, link: Path) -> None:
    """Point `link` at `source` with a relative symbolic link, swapped in atomically (a copy where links fail)."""
    temporary = atomic.staging_name(link, "link")
    try:
        os.symlink(os.path.relpath(source, link.parent), temporary, target_is_directory=True)
    except OSError:  # e.g. Windows without the symlink privilege
        staging = atomic.staging_name(link, "partial")
        shutil.copytree(source, staging)
        atomic.fsync_tree(staging)
        atomic.replace_folder(staging, link)
        return
    if link.exists() and not link.is_symlink():
        remove_folder(link)
    os.replace(temporary, link)
    atomic.fsync_dir(link.parent)


def _write_marker(folder: Path, checkpoint: dict[str, Any]) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            atomic.fsync_file(path)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    marker = {
        "format_version": FORMAT_VERSION,
        "global_step": int(checkpoint.get("global_step", 0)),
        "epoch": int(checkpoint.get("epoch", 0)),
        "saved_at_ns": time.time_ns(),
        "files": files,
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=1))
    atomic.fsync_file(folder / MARKER_FILE)


# ---- recovery from interrupted writes (the steps themselves are lightning_peft.atomic's) --------------------


def _roll_back(directory: Path) -> None:
    """Put back `.NAME.old-*` where a replacement stopped before its new folder was renamed in."""
    for entry in sorted(directory.iterdir()):
        name, kind = _hidden_parts(entry.name)
        if kind == "old" and not os.path.lexists(directory / name) and (entry.is_symlink() or is_complete(entry)):
            with contextlib.suppress(OSError):  # another process (rank) may get there first
                os.rename(entry, directory / name)


def _hidden_parts(name: str) -> tuple[str, str | None]:
    """`.NAME.KIND-TOKEN` → (NAME, KIND) for our staging, old and trash folders; (name, None) otherwise."""
    if not name.startswith("."):
        return name, None
    stem, _, token = name[1:].rpartition("-")
    base, _, kind = stem.rpartition(".")
    if kind in ("partial", "old", "deleting", "link") and base and token:
        return base, kind
    return name, None


def _map_tensors(obj: Any, pack: Any) -> Any:
    """Pack (pack=_pack) or unpack (pack=None) the float32 tensors of a nested optimizer state."""
    if pack is None and isinstance(obj, dict) and _PACKED in obj:
        return _unpack(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, pack) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(v, pack) for v in obj)
    if pack is not None and isinstance(obj, torch.Tensor):
        return pack(obj)
    return obj


def _pack(tensor: torch.Tensor) -> Any:
    """A float32 tensor as one byte buffer: the 3 low bytes of every value as they are, then the compressed high
    bytes (sign and exponent: a handful of distinct values per tensor). Lossless; one storage per tensor."""
    if tensor.dtype != torch.float32 or tensor.numel() < 1024 or tensor.is_sparse:
        return tensor
    data = tensor.detach().cpu().contiguous().view(torch.uint8).reshape(-1, 4).numpy()
    low = np.ascontiguousarray(np.delete(data, _HIGH_BYTE, axis=1)).reshape(-1)
    high = np.frombuffer(_CODEC.compress(np.ascontiguousarray(data[:, _HIGH_BYTE]).tobytes()), dtype=np.uint8)
    return {_PACKED: list(tensor.shape), "high_byte": _HIGH_BYTE, "data": torch.from_numpy(np.concatenate([low, high]))}


def _unpack(packed: dict[str, Any]) -> torch.Tensor:
    buffer = packed["data"].numpy()
    count = int(np.prod(packed[_PACKED], dtype=np.int64))
    high = np.frombuffer(_CODEC.decompress(buffer[3 * count :].tobytes()), dtype=np.uint8)
    data = np.insert(buffer[: 3 * count].reshape(count, 3), packed["high_byte"], high, axis=1)
    return torch.from_numpy(np.ascontiguousarray(data)).view(torch.float32).reshape(packed[_PACKED])
