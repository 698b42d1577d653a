"""The marketplace operations behind `lpeft publish | pull | versions | inspect | yank | unyank`.

publish: choose the version → package offline into the registry's staging area → verify (reload onto the
base, compare logits; lint for serving) → one atomic registry step. pull: resolve the spec → read and check the
manifest → download into a staging folder → verify every checksum (and the base, if given) → rename into place.
yank / unyank: record (or drop) a version's retraction beside it; the version itself never changes.
Nothing here imports torch except the logits check, which needs the model.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from lightning_peft.atomic import check_target, staged_folder
from lightning_peft.errors import ConfigError, DataError
from lightning_peft.hub import manifest as manifest_lib
from lightning_peft.hub import signing
from lightning_peft.hub import yanks as yanks_lib
from lightning_peft.hub.lint import lint_adapter_config
from lightning_peft.hub.package import Package, PackageSpec, package_adapter, read_source
from lightning_peft.hub.registries import get_registry
from lightning_peft.hub.registry import Registry, VersionInfo, check_repo_id
from lightning_peft.hub.verify import check_base, compare_logits
from lightning_peft.hub.versions import check_spec, next_version, parent_of, parse_version, resolve

log = logging.getLogger(__name__)


@dataclass
class PublishResult:
    """What a publish did (or would do, for a dry run)."""

    repo_id: str
    version: str
    location: str | None
    manifest: manifest_lib.Manifest
    logits_difference: float | None
    dry_run: bool
    signer: str | None = None  # the signing key's fingerprint, when signed


def publish(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    *,
    registry: Registry | str | None = None,
    version: str | None = None,
    bump: str | None = None,
    message: str = "",
    private: bool = False,
    dry_run: bool = False,
    out: str | os.PathLike | None = None,
    verify: bool = True,
    sign: str | os.PathLike | None = None,
    **spec: Any,
) -> PublishResult:
    """Package `adapter_dir` and publish it as a new version of `repo_id`.

    Args:
        adapter_dir: A saved PEFT adapter (e.g. `<log_dir>/adapter`).
        repo_id: `org/name`.
        registry: A `Registry`, `"hf"`, a URL or a folder (None: the default local registry).
        version: The exact version, or None to use `bump` (or 1.0.0 for a repo's first version).
        bump: `major`, `minor` or `patch` from the latest published version.
        message: What changed; the commit / index message and the card's history line.
        private: Create the Hub repo private.
        dry_run: Package and verify, but publish nothing.
        out: Also keep a copy of the package folder here.
        verify: Reload the package onto its base and compare logits (needs torch).
        sign: An elliptic-curve private key (PEM) to sign the package with (`hub.signing`).
        **spec: More `PackageSpec` fields: license, description, datasets, base, base_model_id, run_dir,
            allow_pickle.

    Raises:
        ConfigError, DataError: bad input, an existing version, a failed check; nothing is published then.
    """
    registry = registry if isinstance(registry, Registry) else get_registry(registry)
    check_repo_id(repo_id)
    read_source(adapter_dir, allow_pickle=spec.get("allow_pickle", False))  # fail before any network access
    if out is not None:
        check_target(Path(out), option="--out")
    published = [info.version for info in registry.list_versions(repo_id)]
    chosen = next_version(published, version=version, bump=bump)
    parent = parent_of(chosen, published)
    history = [str(v) for v in sorted(published, reverse=True) if v < chosen]
    package_spec = PackageSpec(
        name=repo_id,
        version=str(chosen),
        parent_version=parent and str(parent),
        history=history,
        message=message,
        **spec,
    )
    with registry.staging_area() as staging:
        package = package_adapter(adapter_dir, staging / "package", package_spec)
        _warn_serving(package)
        difference = compare_logits(package.source.path, package.path, package.base.path) if verify else None
        signer = signing.sign(package.path, sign) if sign is not None else None
        if out is not None:
            _copy_package(package.path, Path(out))
        location = None
        if not dry_run:
            location = registry.publish(repo_id, chosen, package.path, message=message, private=private)
            log.debug("Published %s %s to %s", repo_id, chosen, location)
    return PublishResult(repo_id, str(chosen), location, package.manifest, difference, dry_run, signer)


def _warn_serving(package: Package) -> None:
    for problem in package.lint.problems:
        warnings.warn(f"Serving: {problem}", stacklevel=3)


def _copy_package(source: Path, target: Path) -> None:
    import shutil

    with staged_folder(target) as staging:
        for path in source.iterdir():
            shutil.copyfile(path, staging / path.name)


@dataclass
class PullResult:
    repo_id: str
    version: str
    path: Path
    manifest: manifest_lib.Manifest
    base_matches: bool | None
    yanked: str | None = None  # why the version was yanked, when it was pulled by its exact version anyway
    signer: str | None = None  # the fingerprint of the trusted key that signed it, when keys were given


def split_spec(reference: str) -> tuple[str, str]:
    """`org/name@^1.2` → ("org/name", "^1.2"); no `@` means latest."""
    repo_id, _, spec = reference.partition("@")
    return repo_id, spec or "latest"


def pull(
    reference: str,
    to: str | os.PathLike,
    *,
    registry: Registry | str | None = None,
    base: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    trusted_keys: list[str | os.PathLike] | tuple[str | os.PathLike, ...] = (),
) -> PullResult:
    """Download the version of `REPO_ID[@SPEC]` that the spec resolves to into `to`, verified.

    Every file's sha256 is checked (and the base fingerprint, when `base` is given) before anything is moved
    into `to`; on any failure `to` is left as it was. With trusted keys (`trusted_keys` and
    `$LPEFT_TRUSTED_KEYS`), the package must also be signed by one of them, over exactly the bytes pulled.

    Raises:
        ConfigError: bad reference, no matching version, a base mismatch without `force`, an unusable `to`.
        DataError: a malformed manifest, a path escaping the folder, a file that fails its checksum, or (with
            trusted keys) a missing signature, an untrusted signer, or bytes that differ from those signed.
    """
    registry = registry if isinstance(registry, Registry) else get_registry(registry)
    keys = signing.trusted_keys(trusted_keys)
    repo_id, spec = split_spec(reference)
    check_repo_id(repo_id)
    spec = check_spec(spec)
    target = Path(to)
    check_target(target, overwrite=overwrite)
    infos = registry.list_versions(repo_id)
    if not infos:
        raise ConfigError(f"{repo_id} has no published version in {registry.describe()}.")
    version = resolve(spec, [i.version for i in infos], yanked={i.version for i in infos if i.yanked})
    where = f"{repo_id} {version}"
    yanked = next(i.yanked for i in infos if i.version == version)
    if yanked:
        warnings.warn(f"{where} is yanked ({yanked}); pulled because it was asked for exactly.", stacklevel=2)
    raw = registry.read_manifest(repo_id, version)
    manifest = manifest_lib.parse(raw, where=where)
    if manifest.name != repo_id or manifest.version != str(version):
        raise DataError(f"{where}: its manifest says {manifest.name} {manifest.version}; the registry is inconsistent.")
    base_matches = signer = None
    with staged_folder(target, overwrite=overwrite) as staging:
        registry.download(repo_id, version, [f.path for f in manifest.files], staging)
        manifest_lib.verify_files(staging, manifest, where=where)
        (staging / manifest_lib.MANIFEST_FILE).write_bytes(raw)
        _download_signature(registry, repo_id, version, staging)
        if keys:
            signer = signing.verify(staging, keys, where=where)
        if base is not None:
            base_matches = check_base(staging, base, force=force)
    log.debug("Pulled %s %s into %s (every checksum verified)", repo_id, version, target)
    return PullResult(repo_id, str(version), target, manifest, base_matches, yanked, signer)


def _download_signature(registry: Registry, repo_id: str, version: Any, staging: Path) -> None:
    """Fetch the package's signature when it has one; an unsigned package simply lacks the file."""
    try:
        registry.download(repo_id, version, [signing.SIGNATURE_FILE], staging)
    except DataError:
        log.debug("%s %s is not signed", repo_id, version)


def list_versions(repo_id: str, *, registry: Registry | str | None = None) -> list[VersionInfo]:
    """The published versions of `repo_id`, oldest first."""
    registry = registry if isinstance(registry, Registry) else get_registry(registry)
    return registry.list_versions(check_repo_id(repo_id))


def yank(reference: str, reason: str, *, registry: Registry | str | None = None) -> VersionInfo:
    """Retract `REPO_ID@VERSION`: ranges and `latest` skip it from now on; its exact version still pulls.

    Yanking a yanked version again replaces the reason.

    Raises:
        ConfigError: no reason, a reference that is not one exact version, or a version that is not published.
    """
    registry, repo_id, version = _published_version(reference, registry, "yank")
    reason = yanks_lib.check_reason(reason, f"{repo_id} {version}")
    change = partial(yanks_lib.changed, version=str(version), reason=reason, where=f"{repo_id} {version}")
    registry.update_yanks(repo_id, change, message=f"Yank {repo_id.split('/')[-1]} {version}: {reason}")
    return next(i for i in registry.list_versions(repo_id) if i.version == version)


def unyank(reference: str, *, registry: Registry | str | None = None) -> VersionInfo:
    """Undo `yank`: ranges resolve to `REPO_ID@VERSION` again.

    Raises:
        ConfigError: a reference that is not one exact version, a version not published, or not yanked.
    """
    registry, repo_id, version = _published_version(reference, registry, "unyank")
    change = partial(yanks_lib.changed, version=str(version), reason=None, where=f"{repo_id} {version}")
    registry.update_yanks(repo_id, change, message=f"Unyank {repo_id.split('/')[-1]} {version}")
    return next(i for i in registry.list_versions(repo_id) if i.version == version)


def _published_version(reference: str, registry: Registry | str | None, verb: str) -> tuple[Registry, str, Any]:
    """The registry, repo id and version of `REPO_ID@VERSION`, checked to be published."""
    registry = registry if isinstance(registry, Registry) else get_registry(registry)
    repo_id, spec = split_spec(reference)
    check_repo_id(repo_id)
    if "@" not in reference:
        raise ConfigError(f"`lpeft {verb}` needs one exact version: {repo_id}@X.Y.Z, not {reference!r}.")
    version = parse_version(spec, field="REPO_ID@VERSION")
    published = [info.version for info in registry.list_versions(repo_id)]
    if version not in published:
        shown = ", ".join(str(v) for v in published) or "none"
        raise ConfigError(f"{repo_id} {version} is not published in {registry.describe()} (published: {shown}).")
    return registry, repo_id, version


@dataclass
class InspectReport:
    """What `lpeft inspect` found about a folder."""

    path: Path
    manifest: manifest_lib.Manifest | None
    adapter_config: dict[str, Any]
    file_problems: list[str] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    serving_problems: list[str] = field(default_factory=list)
    serving_notes: list[str] = field(default_factory=list)
    base_matches: bool | None = None
    signer: str | None = None  # the fingerprint recorded in lpeft_signature.sig (not checked: see pull)


def inspect(directory: str | os.PathLike, *, base: str | None = None, force: bool = False) -> InspectReport:
    """Check a package folder (or a plain PEFT adapter folder): manifest, checksums, serving lint, base match.

    Raises:
        ConfigError: not an adapter folder, or a base mismatch without `force`.
        DataError: a malformed manifest.
    """
    path = Path(directory)
    source = read_source(path, allow_pickle=True)  # only the config is read; the weights are never loaded
    manifest = None
    report = InspectReport(path, None, source.config)
    if (path / manifest_lib.MANIFEST_FILE).is_file():
        manifest = manifest_lib.read(path)
        report.manifest = manifest
        report.file_problems = manifest_lib.file_problems(path, manifest)
        report.signer = signing.signer(path)
        listed = {f.path for f in manifest.files} | {manifest_lib.MANIFEST_FILE, signing.SIGNATURE_FILE}
        report.extra_files = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and p.relative_to(path).as_posix() not in listed
        )
    lint = lint_adapter_config(source.config)
    report.serving_problems, report.serving_notes = lint.problems, lint.notes
    if base is not None:
        report.base_matches = check_base(path, base, force=force) if manifest else None
    return report
