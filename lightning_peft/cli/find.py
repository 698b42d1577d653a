"""`lpeft list | search`: what a registry holds, as a table for people or JSON (`--json`) for scripts.

Only click is imported here; the commands import `lightning_peft.hub` when they run (never torch).
"""

from __future__ import annotations

import json
from typing import Any

import click

from lightning_peft.cli.guard import run_showing_warnings
from lightning_peft.cli.hub import REGISTRY_HELP

_COLUMNS = ("REPO", "VERSION", "BASE", "METHOD", "SIZE", "LICENSE", "SCORES")


@click.command(name="list")
@click.option("--registry", metavar="hf|URL|PATH", help=REGISTRY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (one object per repo) instead of a table.")
@click.pass_context
def list_command(ctx: click.Context, registry: str | None, as_json: bool) -> None:
    """List every adapter repo of a registry: latest version (not yanked), base model, method, size."""

    def action() -> None:
        from lightning_peft.hub import list_adapters

        _show(list_adapters(registry=registry), as_json=as_json, base=None)

    run_showing_warnings(ctx, action)


@click.command()
@click.argument("text", required=False)
@click.option(
    "--base",
    metavar="MODEL",
    help="Only adapters for this base (Hub id, alias or folder; fingerprints are compared when it is on this machine).",
)
@click.option("--method", metavar="lora|ia3|...", help="Only adapters of this PEFT method.")
@click.option("--license", metavar="ID", help="Only adapters under this license id.")
@click.option("--tag", metavar="T", help="Only adapters whose card has this tag.")
@click.option("--registry", metavar="hf|URL|PATH", help=REGISTRY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (one object per repo) instead of a table.")
@click.pass_context
def search(ctx: click.Context, text: str | None, **options: Any) -> None:
    """Find adapters in a registry whose name, message, base, method, license or tags contain TEXT."""

    def action() -> None:
        from lightning_peft.hub import search as search_adapters

        filters = {key: value for key, value in options.items() if key != "as_json"}
        _show(search_adapters(text, **filters), as_json=options["as_json"], base=options["base"])

    run_showing_warnings(ctx, action)


def _show(found: list[Any], *, as_json: bool, base: str | None) -> None:
    if as_json:
        click.echo(json.dumps([summary.to_dict() for summary in found], indent=2))
        return
    if not found:
        click.echo("No adapter found.")
        return
    columns = (*_COLUMNS, "BASE WEIGHTS") if base else _COLUMNS
    rows = [_row(summary, with_weights=bool(base)) for summary in found]
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
    for row in (columns, *rows):
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for summary in found:
        for version, reason in summary.yanked.items():
            click.echo(f"{summary.repo_id} {version} is yanked: {reason}")


def _row(summary: Any, *, with_weights: bool) -> tuple[str, ...]:
    version = f"{summary.version} (yanked)" if summary.version in summary.yanked else summary.version
    cells = (summary.repo_id, version, summary.base_model or "-", summary.method, _size(summary.size))
    cells += (summary.license or "-", _scores(summary.scores))
    if with_weights:
        weights = {True: "same", False: "DIFFERENT", None: "not checked"}[summary.base_matches]
        cells += (weights,)
    return cells


def _scores(scores: Any) -> str:
    """The recorded harness scores, compact: `capitals/right_capital 0.708 → 0.750`, `;`-separated."""
    shown = []
    for score in scores:
        metric = score.metric if score.filter in (None, "none") else f"{score.metric} ({score.filter})"
        values = " → ".join("-" if v is None else f"{v:.3f}" for v in (score.base, score.adapter))
        shown.append(f"{score.task}/{metric} {values}")
    return "; ".join(shown) or "-"


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


COMMANDS = (list_command, search)


def register(group: click.Group) -> None:
    """Add `lpeft list` and `lpeft search` to the `lpeft` group."""
    for command in COMMANDS:
        group.add_command(command)
