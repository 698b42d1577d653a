"""Registry references (`org/name@^1`) for serving: pulled once per version into a cache, checksums verified."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError

log = logging.getLogger(__name__)

_REFERENCE = re.compile(r"^[\w.-]+/[\w.-]+(@.+)?$")


def adapter_folder(source: str | os.PathLike, *, registry: Any = None, cache_dir: str | os.PathLike) -> Path:
    """The folder an adapter source names: an existing folder as it is, a registry reference pulled (cached).

    Raises:
        ConfigError: neither an existing folder nor a reference; see `fetch_reference` for references.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    if isinstance(source, str) and _REFERENCE.match(source):
        return fetch_reference(source, registry=registry, cache_dir=cache_dir)
    raise ConfigError(
        f"Adapter source {str(source)!r} is neither an existing folder nor a registry reference like 'org/name@^1'."
    )


def fetch_reference(reference: str, *, registry: Any = None, cache_dir: str | os.PathLike) -> Path:
    """The folder of `org/name@SPEC`, pulled (checksums verified) into `cache_dir` once per version.

    Raises:
        ConfigError: a bad reference, an unknown repo, no version matching the spec.
        DataError: a package that fails its checksums.
    """
    from filelock import FileLock

    from lightning_peft.hub import get_registry, pull, split_spec
    from lightning_peft.hub.manifest import MANIFEST_FILE, file_problems, read
    from lightning_peft.hub.registry import Registry, check_repo_id
    from lightning_peft.hub.versions import resolve

    store = registry if isinstance(registry, Registry) else get_registry(registry)
    repo_id, spec = split_spec(reference)
    check_repo_id(repo_id, option="adapter reference")
    versions = [info.version for info in store.list_versions(repo_id)]
    if not versions:
        raise ConfigError(f"{reference!r}: {repo_id} has no published version in {store.describe()}.")
    version = str(resolve(spec, versions))
    # One cache per registry: two registries may hold different packages under the same name and version.
    key = hashlib.sha256(store.describe().encode()).hexdigest()[:12]
    folder = Path(cache_dir) / key / repo_id / version
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        manifest = folder / MANIFEST_FILE
        if manifest.is_file() and not file_problems(folder, read(folder)):
            return folder
        pull(f"{repo_id}@{version}", folder, registry=store, overwrite=True)
    log.info("Pulled %s %s into %s", repo_id, version, folder)
    return folder
