"""lightning-peft: parameter-efficient fine-tuning of causal language models with PyTorch Lightning.

Importing this package is cheap: the public names load their modules (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterServer": "lightning_peft.serving",
    "ConfigError": "lightning_peft.errors",
    "CorruptFileError": "lightning_peft.errors",
    "DataError": "lightning_peft.errors",
    "MissingDependencyError": "lightning_peft.errors",
    "PeftCausalLM": "lightning_peft.module",
    "SFTDataModule": "lightning_peft.data",
    "UnreadableFileError": "lightning_peft.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from lightning_peft.data import SFTDataModule
    from lightning_peft.errors import (
        ConfigError,
        CorruptFileError,
        DataError,
        MissingDependencyError,
        UnreadableFileError,
    )
    from lightning_peft.module import PeftCausalLM
    from lightning_peft.serving import AdapterServer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
