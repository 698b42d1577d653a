"""Exceptions raised for user errors.

Each subclasses a built-in so callers can catch what they already know. Messages follow one rule: name the
parameter, file or field, quote the value received, and say how to fix it. The CLI turns them into one-line
messages and exit codes (see `lightning_peft.cli`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid (raised before any training starts)."""


class DataError(ValueError):
    """A data file is missing, malformed or unusable; the message names the file, the row and the field."""


class CorruptFileError(DataError):
    """A file a command reads is damaged (truncated, invalid JSON, a bad safetensors header) or of the wrong kind;
    the message names the file, what is wrong and the fix (`lightning_peft.files`)."""


class UnreadableFileError(OSError):
    """A file or folder exists but this process cannot read it (permissions, I/O error); the message names it."""


class MissingDependencyError(ImportError):
    """An optional package is needed for what was asked; the message holds the pip command."""


def require(module: str, pip_name: str | None = None, purpose: str = "") -> None:
    """Raise `MissingDependencyError` with the install command unless `module` can be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"The package `{pip_name or module}` is needed{why}; install it with `pip install {pip_name or module}`."
        )
