"""The `lpeft` command: a click group whose training commands delegate to LightningCLI.

Nothing heavy is imported at module level: `lpeft --help` must not import torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from lightning_peft import __version__
from lightning_peft.cli.convert import register as _register_convert_command
from lightning_peft.cli.eval import register as _register_eval_command
from lightning_peft.cli.find import register as _register_find_commands
from lightning_peft.cli.generate import register as _register_generate_command
from lightning_peft.cli.guard import drop_kernel_fetch_notice, run_guarded
from lightning_peft.cli.hub import register as _register_hub_commands
from lightning_peft.cli.merge import register as _register_merge_command

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

        run_guarded(ctx, lambda: run_lightning_cli([name, *args]))

    return command


for _name, _help in LIGHTNING_SUBCOMMANDS.items():
    cli.add_command(_lightning_command(_name, _help))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    # Like `python -m`, let configs name classes of the user's project in the current folder (model.class_path).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    arguments = sys.argv[1:] if argv is None else list(argv)
    if "--debug" not in arguments and not os.environ.get("LPEFT_DEBUG"):
        drop_kernel_fetch_notice()
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if argv is None and command in LIGHTNING_SUBCOMMANDS:
        from lightning_peft.allocator import rerun_on_preferred_allocator

        # Training peaks at nearly twice its live tensors on glibc's heap (lightning_peft.allocator).
        rerun_on_preferred_allocator()
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="lpeft")


for _register in (
    _register_hub_commands,
    _register_find_commands,
    _register_merge_command,
    _register_generate_command,
    _register_convert_command,
    _register_eval_command,
):
    _register(cli)
