"""The `lpeft` command: a click group whose training commands delegate to LightningCLI.

Nothing heavy is imported at module level: `lpeft --help` must not import torch.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

import click

from lightning_peft import __version__
from lightning_peft.errors import ConfigError, DataError, MissingDependencyError

# Exit codes: 1 unexpected failure, 2 bad usage or configuration (as click and jsonargparse use), 3 bad data,
# 4 a missing optional dependency, 130 interrupted.
_EXIT_CODES: dict[type[BaseException], int] = {
    ConfigError: 2,
    DataError: 3,
    MissingDependencyError: 4,
    FileNotFoundError: 3,
}
LIGHTNING_SUBCOMMANDS = {
    "fit": "Fine-tune a model (LightningCLI: --config, --print_config, --model.*, --data.*, --trainer.*).",
    "validate": "Run the validation loop once.",
    "test": "Run the test loop once.",
    "predict": "Run the predict loop.",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lpeft")
@click.option("--debug", is_flag=True, envvar="LPEFT_DEBUG", help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """lightning-peft: parameter-efficient fine-tuning of causal LMs with PyTorch Lightning.

    Run `lpeft fit --help` for every training option, or `lpeft fit --config run.yaml`.
    """
    ctx.obj = {"debug": debug}


def _lightning_command(name: str, help_text: str) -> click.Command:
    @click.command(
        name=name,
        help=help_text + " Every argument is passed to LightningCLI; `--help` lists them.",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
        add_help_option=False,
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_context
    def command(ctx: click.Context, args: tuple[str, ...]) -> None:
        from lightning_peft.cli.lightning import run_lightning_cli

        _run_guarded(ctx, lambda: run_lightning_cli([name, *args]))

    return command


for _name, _help in LIGHTNING_SUBCOMMANDS.items():
    cli.add_command(_lightning_command(_name, _help))


def _run_guarded(ctx: click.Context, action: Callable[[], object]) -> None:
    """Run `action`; turn library errors into one line on stderr and an exit code (tracebacks with --debug)."""
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    _configure_logging(debug)
    try:
        action()
    except KeyboardInterrupt:
        click.echo("lpeft: interrupted", err=True)
        ctx.exit(130)
    except Exception as err:
        if debug:
            raise
        err = _library_error(err)
        code = next((c for cls, c in _EXIT_CODES.items() if isinstance(err, cls)), 1)
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if code == 1:
            message = f"{type(err).__name__}: {message} (run `lpeft --debug ...` for the traceback)"
        click.echo(f"lpeft: error: {message}", err=True)
        ctx.exit(code)


def _library_error(err: BaseException) -> BaseException:
    """The error our code raised, when another layer (jsonargparse instantiating a class) wrapped it."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, tuple(_EXIT_CODES)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _configure_logging(debug: bool) -> None:
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


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    # Like `python -m`, let configs name classes of the user's project in the current folder (model.class_path).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="lpeft")


from lightning_peft.cli.hub import register as _register_hub_commands  # noqa: E402 (the group must exist first)

_register_hub_commands(cli)

from lightning_peft.cli.merge import register as _register_merge_command  # noqa: E402 (the group must exist first)

_register_merge_command(cli)

from lightning_peft.cli.generate import register as _register_generate_command  # noqa: E402 (the group must exist first)

_register_generate_command(cli)

from lightning_peft.cli.convert import register as _register_convert_command  # noqa: E402 (the group must exist first)

_register_convert_command(cli)

from lightning_peft.cli.eval import register as _register_eval_command  # noqa: E402 (the group must exist first)

_register_eval_command(cli)
