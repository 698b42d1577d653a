"""How every `lpeft` command runs: library errors become one line on stderr and an exit code.

The click group (`cli/__init__.py`) and the command modules import this; it imports none of them.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import click

from lightning_peft.errors import ConfigError, DataError, MissingDependencyError, UnreadableFileError

# Exit codes: 1 unexpected failure, 2 bad usage or configuration (as click and jsonargparse use), 3 bad data or a
# missing, damaged or unreadable file, 4 a missing optional dependency, 130 interrupted.
EXIT_CODES: dict[type[BaseException], int] = {
    ConfigError: 2,
    DataError: 3,
    MissingDependencyError: 4,
    FileNotFoundError: 3,
    UnreadableFileError: 3,
}


def run_guarded(ctx: click.Context, action: Callable[[], object]) -> None:
    """Run `action`; turn library errors into one line on stderr and an exit code (tracebacks with --debug)."""
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    configure_logging(debug)
    try:
        action()
    except KeyboardInterrupt:
        click.echo("lpeft: interrupted", err=True)
        ctx.exit(130)
    except Exception as err:
        if debug:
            raise
        err = _library_error(err)
        code = next((c for cls, c in EXIT_CODES.items() if isinstance(err, cls)), 1)
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if code == 1:
            message = f"{type(err).__name__}: {message} (run `lpeft --debug ...` for the traceback)"
        click.echo(f"lpeft: error: {message}", err=True)
        ctx.exit(code)


def run_showing_warnings(ctx: click.Context, action: Callable[[], Any]) -> None:
    """`run_guarded`, also showing the library's warnings as `lpeft: warning:` lines."""

    def guarded() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                action()
            finally:
                for warning in caught:
                    if issubclass(warning.category, UserWarning) and "lightning_peft" in str(warning.filename):
                        click.echo(f"lpeft: warning: {warning.message}", err=True)

    run_guarded(ctx, guarded)


def _library_error(err: BaseException) -> BaseException:
    """The error our code raised, when another layer (jsonargparse instantiating a class) wrapped it."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, tuple(EXIT_CODES)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def configure_logging(debug: bool) -> None:
    """Show the library's INFO messages (adapter path, parameter counts, data counts) on stderr."""
    logger = logging.getLogger("lightning_peft")
    # One handler, bound to the current stderr (a second in-process run may have another, e.g. under tests).
    for old in [h for h in logger.handlers if getattr(h, "_lpeft_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._lpeft_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Lightning's own deprecation noise about torch's pytree API is not something a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing. is deprecated")


def drop_kernel_fetch_notice() -> None:
    """Hide bitsandbytes' import-time notice that it could not fetch an optional kernel.

    On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a 4-bit kernel from the Hub and warns when it
    cannot (offline, or a publisher it does not trust), then uses its own kernel: nothing a user can act on, as the
    first line of every `lpeft fit`. Installed before any command imports bitsandbytes; `--debug` keeps it.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernel_fetch_notice)


def _not_the_kernel_fetch_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
