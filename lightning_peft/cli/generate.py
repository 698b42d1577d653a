"""`lpeft generate`: answers from a base model and any number of LoRA adapters, side by side.

Only click is imported here; torch, transformers and peft load when the command runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from lightning_peft.cli import flags
from lightning_peft.cli.guard import run_showing_warnings
from lightning_peft.errors import ConfigError, DataError
from lightning_peft.files import read_text

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
BASE_LABEL = "base"  # AdapterServer reads it as the base model alone


@click.command()
@flags.model_and_adapters
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A prompt (repeatable).")
@click.option(
    "--prompts-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Prompts, one per line; a .jsonl file holds one object with a `prompt` field per line.",
)
@click.option("--chat", is_flag=True, help="Render each prompt as a user turn with the tokenizer's chat template.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 is greedy decoding."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling (temperature > 0).")
@click.option("--stream", is_flag=True, help="Print tokens as they come (one answer at a time).")
@click.option("--with-base", is_flag=True, help="Also answer with the base model alone.")
@flags.quantization
@flags.registry("Where registry references are pulled from.")
@flags.allow_base_mismatch("Load packages whose recorded base fingerprint differs from --model.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Rows per batch.")
@click.pass_context
def generate(ctx: click.Context, **options: Any) -> None:
    """Generate answers to prompts with a base model and its adapters.

    With several adapters (or --with-base), each prompt runs once per adapter in one mixed batch and the answers
    are printed under the prompt, one `[name] answer` line each.
    """

    def action() -> None:
        from transformers import set_seed

        prompts = _read_prompts(options["prompts"], options["prompts_file"])
        adapters = parse_adapters(options["adapters"])
        server = load_server(options, adapters)
        set_seed(options["seed"])  # after loading: PEFT draws initial LoRA weights before it loads the saved ones
        labels = list(adapters) + ([BASE_LABEL] if options["with_base"] or not adapters else [])
        settings = dict(
            chat=options["chat"], max_new_tokens=options["max_new_tokens"], temperature=options["temperature"]
        )
        if options["stream"]:
            _stream(server, prompts, labels, settings)
        else:
            _batched(server, prompts, labels, settings, options["batch_size"])

    run_showing_warnings(ctx, action)


def _read_prompts(prompts: tuple[str, ...], path: Path | None) -> list[str]:
    if bool(prompts) == bool(path):
        raise ConfigError("Give the prompts with `--prompt TEXT` (repeatable) or `--prompts-file FILE`, not both.")
    if not path:
        return list(prompts)
    lines = read_text(path, fix="save it as UTF-8 text, one prompt per line").splitlines()
    if path.suffix.lower() == ".jsonl":
        found = [_jsonl_prompt(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    else:
        found = [line for line in lines if line.strip()]
    if not found:
        raise DataError(f"{path} holds no prompt; write one prompt per line.")
    return found


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except ValueError as err:
        raise DataError(f"{path}, line {number}: not valid JSON ({err}).") from err
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise DataError(f"{path}, line {number}: needs a `prompt` field holding a string.")
    return row["prompt"]


def parse_adapters(specs: tuple[str, ...]) -> dict[str, str]:
    """`[NAME=]SOURCE` → {name: source}; the name defaults to the folder's or the repo's name."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not (sep and _NAME.match(name)):  # `org/name@>=1` holds '=' but no NAME before it
            source = spec
            stem = source.partition("@")[0].rstrip("/").rsplit("/", 1)[-1]
            name = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "adapter"
        if name == BASE_LABEL or name in adapters:
            raise ConfigError(
                f"`--adapter` {spec!r}: the name {name!r} is {'reserved' if name == BASE_LABEL else 'taken'}; "
                "name it with `--adapter NAME=PATH_OR_REF`."
            )
        adapters[name] = source
    return adapters


def load_server(options: dict[str, Any], adapters: dict[str, str]) -> Any:
    from transformers.utils import logging as hf_logging

    from lightning_peft.serving import AdapterServer

    hf_logging.disable_progress_bar()  # the answers are the output; per-load progress bars would bury them
    server = AdapterServer(options["model"], quantization=options["quantization"], registry=options["registry"])
    for name, source in adapters.items():
        server.load(name, source, force=options["allow_base_mismatch"])
    return server


def _batched(server: Any, prompts: list[str], labels: list[str], settings: dict[str, Any], batch_size: int) -> None:
    """Every (prompt, adapter) pair as one row; rows of several adapters share each batch."""
    rows = [(prompt, label) for prompt in prompts for label in labels]
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        answers += server.generate([p for p, _ in chunk], [label for _, label in chunk], **settings)
    for index, prompt in enumerate(prompts):
        block = answers[index * len(labels) : (index + 1) * len(labels)]
        _print_block(prompt if len(prompts) > 1 else None, dict(zip(labels, block, strict=True)))


def _stream(server: Any, prompts: list[str], labels: list[str], settings: dict[str, Any]) -> None:
    from transformers import TextStreamer

    width = max(len(label) for label in labels) + 2
    for index, prompt in enumerate(prompts):
        if len(prompts) > 1:
            click.echo(("\n" if index else "") + f"> {prompt}")
        for label in labels:
            if len(labels) > 1:
                click.echo(f"[{label}]".ljust(width) + " ", nl=False)
            streamer = TextStreamer(server.tokenizer, skip_prompt=True, skip_special_tokens=True)
            server.generate([prompt], label, streamer=streamer, **settings)


def _print_block(prompt: str | None, answers: dict[str, str]) -> None:
    """`> prompt`, then the answers; with several adapters one `[name] answer` line each, aligned."""
    if prompt is not None:
        click.echo(f"> {prompt}")
    if len(answers) == 1:
        click.echo(next(iter(answers.values())).strip())
    else:
        width = max(len(label) for label in answers) + 2
        for label, answer in answers.items():
            lines = answer.strip().splitlines() or [""]
            click.echo(f"[{label}]".ljust(width) + " " + lines[0])
            for line in lines[1:]:
                click.echo(" " * (width + 1) + line)
    if prompt is not None:
        click.echo()


def register(group: click.Group) -> None:
    """Add `generate` to the `lpeft` group."""
    group.add_command(generate)
