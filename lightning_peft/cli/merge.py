"""`lpeft merge`: merge an adapter into its base model, verified, into a standard transformers folder.

Only click is imported here; torch, transformers and peft load when the command runs.
"""

from __future__ import annotations

import json
from typing import Any

import click

from lightning_peft.cli import flags
from lightning_peft.cli.guard import run_guarded
from lightning_peft.options import DTYPES, MERGE_MODES, QUANTIZATIONS


@click.command()
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The model folder to write.")
@click.option("--base", metavar="MODEL", help="The base model (alias, folder, Hub id) [default: the adapter config's].")
@click.option(
    "--quantization",
    type=click.Choice(["auto", *QUANTIZATIONS]),
    default="auto",
    show_default=True,
    help="How the base was loaded in training; auto reads the run's hparams.yaml next to the adapter, else none.",
)
@click.option("--quantization-options", metavar="JSON", help="BitsAndBytesConfig arguments used in training, as JSON.")
@click.option(
    "--mode",
    type=click.Choice(MERGE_MODES),
    default="dequantized",
    show_default=True,
    help="For a quantized base: merge onto its dequantized weights (what the adapter was trained against), onto "
    "the original full-precision weights, or PEFT's lossy requantizing merge.",
)
@click.option("--dtype", type=click.Choice(DTYPES), help="Dtype of the saved weights [default: the base's].")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
@click.option(
    "--tolerance",
    type=float,
    help="Largest max-abs logit difference accepted between the merged and the unmerged model [default: 1e-4].",
)
@click.option(
    "--compare-modes/--no-compare-modes",
    default=None,
    help="Also measure the other merge modes for the report [default: when the base is quantized].",
)
@flags.overwrite("Replace an existing, non-empty --out folder.")
@click.pass_context
def merge(ctx: click.Context, adapter_dir: str, **options: Any) -> None:
    """Merge the PEFT adapter in ADAPTER_DIR into its base model and write a transformers model folder to --out.

    The merged model's logits are checked against the unmerged adapter model on fixed probes before anything is
    written; the numbers go to merge_report.json beside the weights. On failure, --out is not created.
    """

    def action() -> None:
        from lightning_peft.merging import merge_adapter

        _quiet_progress_bars()
        quantization = None if options["quantization"] == "auto" else options["quantization"]
        report = merge_adapter(
            adapter_dir,
            options["out"],
            base=options["base"],
            quantization=quantization,
            quantization_options=_json_options(options["quantization_options"]),
            mode=options["mode"],
            dtype=options["dtype"],
            tolerance=options["tolerance"],
            max_shard_size=options["max_shard_size"],
            force=options["overwrite"],
            compare_modes=options["compare_modes"],
        )
        click.echo(report.output)

    run_guarded(ctx, action)


def _json_options(text: str | None) -> dict[str, Any] | None:
    from lightning_peft.errors import ConfigError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"`--quantization-options` {text!r} is not valid JSON: {err}.") from None
    if not isinstance(value, dict):
        raise ConfigError(
            f'`--quantization-options` {text!r} must be a JSON object, e.g. \'{{"bnb_4bit_quant_type": "fp4"}}\'.'
        )
    return value


def _quiet_progress_bars() -> None:
    # A merge loads the base several times; transformers' per-load progress bars would bury the report lines.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def register(group: click.Group) -> None:
    """Add `merge` to the `lpeft` group."""
    group.add_command(merge)
