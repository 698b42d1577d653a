"""Flags shared by several `lpeft` commands, one spelling each, and the old spellings kept as hidden aliases.

`--overwrite` replaces an existing output (`merge`, `convert`, `pull`); `--allow-base-mismatch` accepts an adapter
whose recorded base fingerprint differs (`pull`, `inspect`, `generate`). Both were `--force` before: that spelling
still works, is hidden from `--help`, and prints one deprecation line on stderr naming the new flag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def flag(name: str, help_text: str, *, deprecated: str | None = None) -> Callable[[F], F]:
    """A boolean option `name` (its value under the name without dashes, `-` → `_`), and optionally its old
    spelling `deprecated`: hidden, still working, warning once on stderr."""
    dest = name.lstrip("-").replace("-", "_")
    key = f"lpeft_deprecated_{dest}"

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            click.echo(f"lpeft: warning: {deprecated} is deprecated; use {name}.", err=True)
            ctx.meta[key] = True
        return value

    def combine(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        # Options given on the command line are processed first, so a given old spelling is already recorded.
        return bool(value or ctx.meta.get(key))

    def decorate(function: F) -> F:
        function = click.option(name, dest, is_flag=True, help=help_text, callback=combine)(function)
        if deprecated is not None:
            function = click.option(deprecated, key, is_flag=True, hidden=True, expose_value=False, callback=remember)(
                function
            )
        return function

    return decorate


def overwrite(help_text: str) -> Callable[[F], F]:
    """`--overwrite` (formerly `--force`): replace an existing output."""
    return flag("--overwrite", help_text, deprecated="--force")


def allow_base_mismatch(help_text: str) -> Callable[[F], F]:
    """`--allow-base-mismatch` (formerly `--force`): accept an adapter recorded for another base."""
    return flag("--allow-base-mismatch", help_text, deprecated="--force")
