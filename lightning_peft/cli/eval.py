"""`lpeft eval`: lm-evaluation-harness tasks on a base model and its adapters, one table side by side.

Models load as in `lpeft generate` (aliases, --quantization, adapter folders or registry references, one base
holding every adapter); the harness scores each in turn. Only click is imported here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from lightning_peft.cli import flags
from lightning_peft.cli.generate import BASE_LABEL, load_server, parse_adapters
from lightning_peft.cli.guard import run_showing_warnings
from lightning_peft.errors import ConfigError

log = logging.getLogger("lightning_peft.evaluation")


@click.command(name="eval")
@flags.model_and_adapters
@click.option("--with-base", is_flag=True, help="Also evaluate the base model alone (always, without --adapter).")
@click.option(
    "--tasks",
    "tasks",
    required=True,
    multiple=True,
    metavar="T1,T2",
    help="Harness task names (arc_easy, mmlu ...) or task YAML files, comma-separated (repeatable).",
)
@click.option(
    "--limit",
    type=click.FloatRange(min=0, min_open=True),
    help="The most documents per task (below 1: that fraction of each task) [default: all].",
)
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Examples in each prompt [default: each task's own].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Requests per batch.")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder for results.json (and samples/ with --log-samples).",
)
@click.option(
    "--chat", is_flag=True, help="Render prompts with the chat template (each adapter's own when it saved one)."
)
@click.option("--log-samples", is_flag=True, help="Also write each document's prompt, reply and scores (--output).")
@flags.quantization
@flags.registry("Where registry references are pulled from.")
@flags.allow_base_mismatch("Load packages whose recorded base fingerprint differs from --model (a warning instead).")
@click.pass_context
def eval_command(ctx: click.Context, **options: Any) -> None:
    """Score a base model and its adapters on lm-evaluation-harness tasks, side by side.

    Tasks are checked (and their data read) before any model loads. The table has one row per task and metric
    and one column per model, each `value ± stderr`; --output keeps the harness's full results as JSON.
    """

    def action() -> None:
        from lightning_peft.evaluation import format_table, metric_rows, resolve_tasks

        if options["log_samples"] and not options["output"]:
            raise ConfigError("`--log-samples` writes into the --output folder; give `--output DIR` too.")
        tasks = resolve_tasks([t for spec in options["tasks"] for t in spec.split(",")])
        adapters = parse_adapters(options["adapters"])
        server = load_server(options, adapters)
        labels = ([BASE_LABEL] if options["with_base"] or not adapters else []) + list(adapters)
        results = {label: _evaluate(server, label, tasks, options) for label in labels}
        click.echo(format_table(metric_rows(results), labels))
        if options["output"]:
            _write(options, tasks.labels, {label: adapters.get(label) for label in labels}, results)

    run_showing_warnings(ctx, action)


def _evaluate(server: Any, label: str, tasks: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The harness's results for one model: the base alone, or the base with adapter `label` active."""
    from lightning_peft.evaluation import evaluate

    settings = dict(
        limit=_limit(options["limit"]),
        num_fewshot=options["num_fewshot"],
        batch_size=options["batch_size"],
        chat=options["chat"],
        chat_template=server.chat_template(label) if options["chat"] else None,
        log_samples=options["log_samples"],
    )
    log.info("Evaluating %s on %s", label, ", ".join(tasks.labels))
    if label == BASE_LABEL:
        with server.base() as model:
            return evaluate(model, server.tokenizer, tasks, **settings)
    server.activate(label)
    return evaluate(server.model, server.tokenizer, tasks, **settings)


def _limit(value: float | None) -> int | float | None:
    """Whole numbers are document counts (the harness reads a float below 1 as a fraction)."""
    return int(value) if value is not None and value >= 1 else value


def _write(options: dict[str, Any], task_labels: list[str], sources: dict[str, Any], results: dict) -> None:
    from lightning_peft.atomic import write_text
    from lightning_peft.evaluation import results_payload, write_results

    settings = {
        "tasks": task_labels,
        **{k: options[k] for k in ("limit", "num_fewshot", "batch_size", "chat", "quantization")},
    }
    path = write_results(options["output"], results_payload(options["model"], results, sources, settings))
    for label, run in results.items():
        for task, samples in (run.get("samples") or {}).items():
            lines = "".join(json.dumps(s, default=str) + "\n" for s in samples)
            write_text(options["output"] / "samples" / label / f"{task}.jsonl", lines)
    log.info("Results written to %s", path)


def register(group: click.Group) -> None:
    """Add `eval` to the `lpeft` group."""
    group.add_command(eval_command)
