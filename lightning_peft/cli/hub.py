"""`lpeft publish | pull | versions | inspect | yank | unyank`: the adapter marketplace on the command line.

Only click is imported here; the commands import `lightning_peft.hub` when they run, and torch only for the
logits check of `publish` (skip it with `--no-verify`).
"""

from __future__ import annotations

from typing import Any

import click

from lightning_peft.cli import flags
from lightning_peft.cli.guard import run_showing_warnings
from lightning_peft.options import BUMP_PARTS

REGISTRY_HELP = (
    "`hf` for the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN), an http(s) Hub URL, s3://, gs:// or az://bucket/prefix "
    "(object storage; credentials from the storage's own configuration), or a local registry folder "
    "[default: $LPEFT_REGISTRY or ~/.local/share/lightning_peft/registry]."
)


@click.command()
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@click.option("--version", "version", metavar="X.Y.Z", help="The version to publish (semver).")
@click.option("--bump", type=click.Choice(BUMP_PARTS), help="Bump the latest published version.")
@click.option("--registry", metavar="hf|URL|PATH", help=REGISTRY_HELP)
@click.option("--private", is_flag=True, help="Create the Hub repo private.")
@click.option("--license", "license_id", metavar="ID", help="License id for the card (e.g. apache-2.0).")
@click.option("--message", "-m", default="", help="What changed in this version.")
@click.option("--description", help="What the adapter does, for the card (a factual sentence otherwise).")
@click.option(
    "--dataset", "datasets", multiple=True, metavar="ID", help="A Hub data set it was trained on (repeatable)."
)
@click.option("--base", metavar="PATH_OR_ALIAS", help="The base model [default: the adapter config's].")
@click.option("--base-model-id", metavar="ID", help="The base model's Hub id for the card, when it cannot be inferred.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="The run's log dir [default: the adapter's parent].")
@click.option("--allow-pickle", is_flag=True, help="Publish pickle (.bin) weights; they are never unpickled here.")
@click.option("--no-verify", is_flag=True, help="Skip reloading the package onto the base to compare logits.")
@click.option("--dry-run", is_flag=True, help="Package and verify, but publish nothing.")
@click.option("--out", type=click.Path(file_okay=False), help="Also write the package folder here.")
@click.option(
    "--sign",
    "sign_key",
    metavar="KEY",
    type=click.Path(dir_okay=False),
    help="Sign the package with this elliptic-curve private key (PEM), offline (OpenSSF model-signing).",
)
@click.pass_context
def publish(ctx: click.Context, adapter_dir: str, repo_id: str, **options: Any) -> None:
    """Package ADAPTER_DIR (card, manifest, checksums) and publish it as a new version of REPO_ID (org/name)."""

    def action() -> None:
        from lightning_peft.hub import publish as publish_adapter

        result = publish_adapter(
            adapter_dir,
            repo_id,
            registry=options["registry"],
            version=options["version"],
            bump=options["bump"],
            message=options["message"],
            private=options["private"],
            dry_run=options["dry_run"],
            out=options["out"],
            verify=not options["no_verify"],
            license=options["license_id"],
            description=options["description"],
            datasets=list(options["datasets"]),
            base=options["base"],
            base_model_id=options["base_model_id"],
            run_dir=options["run_dir"],
            allow_pickle=options["allow_pickle"],
            sign=options["sign_key"],
        )
        files = len(result.manifest.files) + 1 + bool(result.signer)
        if result.dry_run:
            click.echo(f"Dry run: {repo_id} {result.version} ({files} files) is ready; nothing was published.")
        else:
            click.echo(f"Published {repo_id} {result.version} ({files} files) to {result.location}")
        if result.signer:
            click.echo(f"Signed by key {result.signer}")
        if options["out"]:
            click.echo(f"Package written to {options['out']}")

    run_showing_warnings(ctx, action)


@click.command()
@click.argument("reference", metavar="REPO_ID[@SPEC]")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="The folder to write.")
@click.option("--registry", metavar="hf|URL|PATH", help=REGISTRY_HELP)
@click.option("--base", metavar="MODEL", help="Check the adapter against this base model (alias, folder, Hub id).")
@flags.allow_base_mismatch("Accept a base whose fingerprint differs (with a warning).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --to folder.")
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    metavar="PUB",
    type=click.Path(dir_okay=False),
    help="Only accept a package signed by this public key (PEM; repeatable; also $LPEFT_TRUSTED_KEYS).",
)
@click.pass_context
def pull(ctx: click.Context, reference: str, **options: Any) -> None:
    """Download a version of an adapter, checking every checksum before anything lands in --to.

    SPEC is a version (1.2.3), a range (^1.2, ~1.2, >=1,<2) or `latest` (the default). Ranges and `latest` skip
    yanked versions; an exact version pulls even when yanked (with a warning).
    """

    def action() -> None:
        from lightning_peft.hub import pull as pull_adapter

        settings = {k: v for k, v in options.items() if k not in ("to", "allow_base_mismatch")}
        result = pull_adapter(reference, options["to"], force=options["allow_base_mismatch"], **settings)
        checked = "; base fingerprint matches" if result.base_matches else ""
        checked += f"; signed by trusted key {result.signer}" if result.signer else ""
        checked += f"; yanked: {result.yanked}" if result.yanked else ""
        click.echo(f"Pulled {result.repo_id} {result.version} into {result.path} (checksums verified{checked})")

    run_showing_warnings(ctx, action)


@click.command()
@click.argument("repo_id")
@click.option("--registry", metavar="hf|URL|PATH", help=REGISTRY_HELP)
@click.pass_context
def versions(ctx: click.Context, repo_id: str, registry: str | None) -> None:
    """List the published versions of REPO_ID, newest first."""

    def action() -> None:
        from lightning_peft.hub import list_versions
        from lightning_peft.hub.versions import latest

        found = list_versions(repo_id, registry=registry)
        if not found:
            click.echo(f"{repo_id}: no published version")
            return
        newest = latest(info.version for info in found if not info.yanked)
        for info in reversed(found):
            mark = "  (latest)" if info.version == newest else f"  (yanked: {info.yanked})" if info.yanked else ""
            details = "  ".join(str(x) for x in (info.created_at, info.message) if x)
            click.echo(f"{info.version}{mark}  {details}".rstrip())

    run_showing_warnings(ctx, action)


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--base", metavar="MODEL", help="Check compatibility with this base model (alias, folder, Hub id).")
@flags.allow_base_mismatch("Report a base mismatch instead of failing on it.")
@click.option(
    "--serving",
    type=click.Choice(["vllm"]),
    help="Only check whether this server can load the adapter: one reason per line, exit code 2 if it cannot.",
)
@click.pass_context
def inspect(
    ctx: click.Context, directory: str, base: str | None, allow_base_mismatch: bool, serving: str | None
) -> None:
    """Show a package's manifest, check its files, serving compatibility and (with --base) its base model."""
    if serving is not None:
        _inspect_serving(ctx, directory, base)
        return

    def action() -> None:
        from lightning_peft.errors import DataError
        from lightning_peft.hub import inspect as inspect_folder

        report = inspect_folder(directory, base=base, force=allow_base_mismatch)
        for line in _report_lines(report):
            click.echo(line)
        if report.file_problems:
            raise DataError(f"{directory}: {report.file_problems[0]} ({len(report.file_problems)} problem(s)).")

    run_showing_warnings(ctx, action)


def _inspect_serving(ctx: click.Context, directory: str, base: str | None) -> None:
    """`inspect --serving vllm`: "vLLM: loadable" or "vLLM: not loadable" and the reasons; exit code 2 if not."""
    found: list[Any] = []

    def action() -> None:
        from pathlib import Path

        from lightning_peft.errors import ConfigError
        from lightning_peft.hub.lint import lint_adapter_dir

        if base is not None:
            raise ConfigError("`--serving` checks the adapter's own files; run `lpeft inspect DIR --base ...` apart.")
        if not Path(directory).is_dir():
            raise ConfigError(f"`DIRECTORY` {directory} is not a folder.")
        report = lint_adapter_dir(directory)
        click.echo("vLLM: loadable" if report.vllm_compatible else "vLLM: not loadable")
        for line in report.problems:
            click.echo(f"  - {line}")
        for line in report.notes:
            click.echo(f"  note: {line}")
        found.append(report)

    run_showing_warnings(ctx, action)
    if found and not found[0].vllm_compatible:
        ctx.exit(2)  # outside the guarded action: scripts gate on the code, and this is a verdict, not an error


def _report_lines(report: Any) -> list[str]:
    config, manifest = report.adapter_config, report.manifest
    lines = [f"{report.path}: {config.get('peft_type')} adapter (base {config.get('base_model_name_or_path')})"]
    if manifest is None:
        lines.append("  no lpeft_manifest.json: a plain PEFT adapter, not a package (checksums cannot be checked)")
    else:
        base = manifest.base_model
        lines += [
            f"  package: {manifest.name} {manifest.version} (created {manifest.created_at})",
            f"  base: {base.id or 'local model'}  fingerprint {base.fingerprint}",
            f"  files: {len(manifest.files)} listed, "
            + ("all match their sha256" if not report.file_problems else f"{len(report.file_problems)} problem(s)"),
        ]
        lines += [f"    {problem}" for problem in report.file_problems]
        lines += [f"  not in the manifest: {', '.join(report.extra_files)}"] if report.extra_files else []
        lines.append(
            f"  signer: key {report.signer} (verified by `lpeft pull --trusted-key`)"
            if report.signer
            else "  signer: none (unsigned)"
        )
    lines += [f"  serving: {p}" for p in report.serving_problems] or ["  serving: vLLM can load it as a LoRA adapter"]
    lines += [f"  serving: {n}" for n in report.serving_notes]
    if report.base_matches is not None:
        lines.append(
            "  base: the fingerprint matches"
            if report.base_matches
            else "  base: MISMATCH (accepted with --allow-base-mismatch)"
        )
    return lines


@click.command()
@click.argument("reference", metavar="REPO_ID@VERSION")
@click.option("--reason", metavar="TEXT", help="Why it is retracted; shown to everyone who lists or pulls it.")
@click.option("--registry", metavar="hf|URL|PATH", help=REGISTRY_HELP)
@click.pass_context
def yank(ctx: click.Context, reference: str, reason: str | None, registry: str | None) -> None:
    """Retract a published version: no range or `latest` resolves to it, its exact version still pulls."""

    def action() -> None:
        from lightning_peft.hub import yank as yank_version

        info = yank_version(reference, reason or "", registry=registry)
        click.echo(f"Yanked {reference.partition('@')[0]} {info.version}: {info.yanked}")

    run_showing_warnings(ctx, action)


@click.command()
@click.argument("reference", metavar="REPO_ID@VERSION")
@click.option("--registry", metavar="hf|URL|PATH", help=REGISTRY_HELP)
@click.pass_context
def unyank(ctx: click.Context, reference: str, registry: str | None) -> None:
    """Undo `lpeft yank`: ranges resolve to the version again."""

    def action() -> None:
        from lightning_peft.hub import unyank as unyank_version

        info = unyank_version(reference, registry=registry)
        click.echo(f"Unyanked {reference.partition('@')[0]} {info.version}")

    run_showing_warnings(ctx, action)


COMMANDS = (publish, pull, versions, inspect, yank, unyank)


def register(group: click.Group) -> None:
    """Add the marketplace commands to the `lpeft` group."""
    for command in COMMANDS:
        group.add_command(command)
