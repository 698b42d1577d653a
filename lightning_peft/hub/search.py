"""Finding adapters: `lpeft list` (every repo of a registry) and `lpeft search` (filtered by text, base, method,
license, tag), as AdapterHub's `list_adapters(model_name=...)` and the Hub's `base_model:adapter:<id>` filter do.

A registry names its repos (`Registry.list_repos`: the folders of a local registry, `HfApi.list_models` on the
Hub); each repo is summarised from the manifest of its latest version that is not yanked. `--base` keeps the
adapters trained for that base's Hub id and, when the base is on this machine (a folder, an alias, the Hub
cache), compares fingerprints: `base_matches` is False for an adapter trained on other weights under the same id.
Nothing here imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lightning_peft.errors import ConfigError, DataError, MissingDependencyError
from lightning_peft.hub import manifest as manifest_lib
from lightning_peft.hub.card import package_tags
from lightning_peft.hub.registries import get_registry
from lightning_peft.hub.registry import Registry
from lightning_peft.hub.versions import latest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSummary:
    """One repo of a registry, as its latest version that is not yanked describes it."""

    repo_id: str
    version: str  # the latest version not yanked (the latest one when every version is yanked)
    base_model: str | None  # the base's Hub id
    method: str  # PEFT's peft_type: LORA, IA3 ...
    size: int  # bytes, every file of the package
    license: str | None
    tags: tuple[str, ...]
    message: str
    fingerprint: str  # of the base it was trained on
    yanked: dict[str, str] = field(default_factory=dict)  # version → reason, for every yanked version
    base_matches: bool | None = None  # with `base` on this machine: whether it was trained on those weights
    # The harness scores its run recorded (LmEvalCallback): task, metric, base and adapter values.
    scores: tuple[manifest_lib.HarnessScore, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class _Base:
    """What `--base` names: its Hub id (when known) and its fingerprint (when it is on this machine)."""

    hub_id: str | None
    fingerprint: str | None


def list_adapters(*, registry: Registry | str | None = None) -> list[AdapterSummary]:
    """Every repo of `registry` with at least one published version, sorted by repo id."""
    return search(registry=registry)


def search(
    text: str | None = None,
    *,
    base: str | None = None,
    method: str | None = None,
    license: str | None = None,
    tag: str | None = None,
    registry: Registry | str | None = None,
) -> list[AdapterSummary]:
    """The adapters of `registry` that match every filter given.

    Args:
        text: Words that must all appear (case-insensitive) in the repo id, message, base, method, license or tags.
        base: A base model: a Hub id, an alias or a folder. Keeps the adapters trained for its Hub id; when it is
            on this machine, `base_matches` says whether each one was trained on these very weights (a base
            folder with no known Hub id keeps only the adapters whose fingerprint matches).
        method: A PEFT method (lora, ia3 ...), case-insensitive.
        license: A license id (apache-2.0 ...).
        tag: A card tag.
        registry: A `Registry`, `"hf"`, a URL or a folder (None: the default local registry).
    """
    registry = registry if isinstance(registry, Registry) else get_registry(registry)
    wanted = _base(base) if base else None
    found = []
    for repo_id in registry.list_repos(base_model_id=wanted.hub_id if wanted else None):
        summary = _summary(registry, repo_id)
        if summary is None or not _matches(summary, text, method, license, tag):
            continue
        if wanted is not None:
            summary = _against_base(summary, wanted)
            if summary is None:
                continue
        found.append(summary)
    return found


def _summary(registry: Registry, repo_id: str) -> AdapterSummary | None:
    """The repo's summary, or None for a repo with no version or no lightning-peft manifest (not a package)."""
    infos = registry.list_versions(repo_id)
    chosen = latest(i.version for i in infos if not i.yanked) or latest(i.version for i in infos)
    if chosen is None:
        return None
    try:
        manifest = manifest_lib.parse(registry.read_manifest(repo_id, chosen), where=f"{repo_id} {chosen}")
    except (ConfigError, DataError) as err:
        log.debug("Skipping %s: %s", repo_id, err)
        return None
    return AdapterSummary(
        repo_id=repo_id,
        version=str(chosen),
        base_model=manifest.base_model.id,
        method=manifest.adapter.method,
        size=sum(f.size for f in manifest.files),
        license=manifest.license,
        tags=package_tags(manifest),
        message=manifest.message,
        fingerprint=manifest.base_model.fingerprint,
        yanked={str(i.version): i.yanked for i in infos if i.yanked},
        scores=manifest.harness,
    )


def _matches(summary: AdapterSummary, text: str | None, method: str | None, lic: str | None, tag: str | None) -> bool:
    fields = [summary.repo_id, summary.message, summary.base_model, summary.method, summary.license, *summary.tags]
    haystack = " ".join(str(f) for f in fields if f).lower()
    return (
        all(word in haystack for word in (text or "").lower().split())
        and (method is None or summary.method.lower() == method.lower())
        and (lic is None or (summary.license or "").lower() == lic.lower())
        and (tag is None or tag.lower() in (t.lower() for t in summary.tags))
    )


def _base(base: str) -> _Base:
    """The Hub id and, when the base is on this machine, the fingerprint of what `--base` names."""
    from lightning_peft.hub.fingerprint import fingerprint, locate_base
    from lightning_peft.models import hub_id_for

    try:
        located = locate_base(base)
    except (ConfigError, MissingDependencyError):
        return _Base(hub_id_for(base), None)  # not here: compare Hub ids only
    return _Base(located.hub_id, fingerprint(located.path))


def _against_base(summary: AdapterSummary, base: _Base) -> AdapterSummary | None:
    """`summary` marked with whether it fits `base`, or None when it was trained for another base."""
    from dataclasses import replace

    same_weights = base.fingerprint is not None and summary.fingerprint == base.fingerprint
    if base.hub_id is None:
        return replace(summary, base_matches=True) if same_weights else None
    if summary.base_model != base.hub_id:
        return None  # as the Hub's `base_model:adapter:<id>` filter: the same answer from every registry
    return replace(summary, base_matches=same_weights if base.fingerprint else None)
