"""Flags shared by several `lpeft` commands, one spelling each, and the old spellings kept as hidden aliases.

`--overwrite` replaces an existing output (`merge`, `convert`, `pull`); `--allow-base-mismatch` accepts an adapter
whose recorded base fingerprint differs (`pull`, `inspect`, `generate`). Both were `--force` before: that spelling
still works, is hidden from `--help`, and prints one deprecation line on stderr naming the new flag.

`--model`, `--adapter`, `--quantization` and `--registry` are the model-loading options of `generate` and `eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from lightning_peft.options import QUANTIZATIONS

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


def model_and_adapters(function: F) -> F:
    """`--model BASE` (required) and repeatable `--adapter [NAME=]PATH_OR_REF` (collected as `adapters`)."""
    function = click.option(
        "--adapter",
        "adapters",
        multiple=True,
        metavar="[NAME=]PATH_OR_REF",
        help="A LoRA adapter folder or registry reference (org/name@^1); repeat for several [default name: the "
        "folder's or the repo's].",
    )(function)
    return click.option(
        "--model", "model", required=True, metavar="BASE", help="The base model: an alias, a folder or a Hub id."
    )(function)


def quantization(function: F) -> F:
    """`--quantization none|nf4|...`: how the base is loaded."""
    return click.option("--quantization", type=click.Choice(QUANTIZATIONS), default="none", show_default=True)(function)


def registry(help_text: str) -> Callable[[F], F]:
    """`--registry hf|URL|PATH`: where registry references resolve."""
    return click.option("--registry", metavar="hf|URL|PATH", help=help_text)
