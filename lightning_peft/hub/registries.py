"""A `--registry` value → a registry: `hf` (or an http(s) URL) selects the Hugging Face Hub (`hf_registry.py`);
`s3://`, `memory://` and other fsspec URLs select object storage (`fsspec_registry.py`), `file://` a folder;
any other value is a local registry folder (`registry.py`); none is the default local folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_peft.hub.fsspec_registry import FsspecRegistry, is_fsspec_url
from lightning_peft.hub.hf_registry import HfRegistry
from lightning_peft.hub.registry import LocalRegistry, Registry, default_registry_root


def get_registry(spec: str | os.PathLike | None = None) -> Registry:
    """`hf` or an http(s) URL → the Hugging Face Hub; a folder → a local registry; None → the default folder."""
    text = str(spec).strip() if spec is not None else ""
    if text.lower() in ("hf", "hub", "huggingface"):
        return HfRegistry()
    if text.startswith(("http://", "https://")):
        return HfRegistry(endpoint=text.rstrip("/"))
    if text.lower().startswith("file://"):
        return LocalRegistry(Path(text[len("file://") :]).expanduser())
    if is_fsspec_url(text):
        return FsspecRegistry(text)
    return LocalRegistry(Path(text).expanduser() if text else default_registry_root())
