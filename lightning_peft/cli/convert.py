"""`lpeft convert`: an Axolotl LoRA/QLoRA config → a lightning-peft run config for `lpeft fit`.

Only click is imported here; the conversion itself imports no torch (`lightning_peft.interop.axolotl`).
"""

from __future__ import annotations

import click

from lightning_peft.cli import flags
from lightning_peft.cli.guard import run_guarded


@click.command()
@click.argument("source", metavar="AXOLOTL_YAML", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False),
    help="The lightning-peft YAML to write [default: print it].",
)
@flags.overwrite("Replace an existing --output file.")
@click.pass_context
def convert(ctx: click.Context, source: str, out: str | None, overwrite: bool) -> None:
    """Convert an Axolotl LoRA/QLoRA config into a config for `lpeft fit --config`.

    Every Axolotl key that cannot be carried over is listed, with the reason, at the top of the output and as a
    warning here.
    """

    def action() -> None:
        from pathlib import Path

        from lightning_peft.interop import convert_axolotl_file, write_run_config

        conversion = convert_axolotl_file(source)
        text = conversion.to_yaml(Path(source).name)
        if out is not None:
            write_run_config(text, out, overwrite=overwrite)
        for warning in conversion.warnings():
            click.echo(f"lpeft: warning: {warning}", err=True)
        if out is None:
            click.echo(text, nl=False)
            return
        click.echo(
            f"Wrote {out}: {len(conversion.carried)} Axolotl settings carried over, {len(conversion.dropped)} not "
            f"(listed at its top). Run it with: lpeft fit --config {out}"
        )

    run_guarded(ctx, action)


def register(group: click.Group) -> None:
    """Add `convert` to the `lpeft` group."""
    group.add_command(convert)
