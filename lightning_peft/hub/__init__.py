"""The adapter marketplace: versioned, documented, verifiable adapter packages on the Hub or in a folder.

    from lightning_peft.hub import publish, pull, list_versions, inspect, check_base

    publish("runs/x/lightning_logs/version_0/adapter", "acme/capitals", bump="minor", registry="hf")
    pull("acme/capitals@^1.2", "adapters/capitals", registry="hf", base="smollm2-135m-instruct")

Modules: `versions` (semver and ranges), `fingerprint` (the base model's identity), `runinfo` (what the run
logged), `plot` (loss curve), `lint` (serving compatibility), `manifest` (the typed `Manifest`), `card`, `package` (offline
packaging), `registry` (interface + local folder registry), `hf_registry` (the Hub), `fsspec_registry` (object storage) and `conditional` (its conditional writes), `yanks` (retracted versions), `search` (list and search), `verify` (checks
that need the model), `api` (the operations). Importing this package does not import torch.
"""

from __future__ import annotations

from lightning_peft.hub.api import (
    PublishResult,
    PullResult,
    inspect,
    list_versions,
    publish,
    pull,
    split_spec,
    unyank,
    yank,
)
from lightning_peft.hub.fingerprint import fingerprint, locate_base
from lightning_peft.hub.manifest import Manifest
from lightning_peft.hub.package import Package, PackageSpec, package_adapter
from lightning_peft.hub.registries import get_registry
from lightning_peft.hub.registry import LocalRegistry, Registry, VersionInfo
from lightning_peft.hub.search import AdapterSummary, list_adapters, search
from lightning_peft.hub.verify import check_base

__all__ = [
    "AdapterSummary",
    "LocalRegistry",
    "Manifest",
    "Package",
    "PackageSpec",
    "PublishResult",
    "PullResult",
    "Registry",
    "VersionInfo",
    "check_base",
    "fingerprint",
    "get_registry",
    "inspect",
    "list_adapters",
    "list_versions",
    "locate_base",
    "package_adapter",
    "publish",
    "pull",
    "search",
    "split_spec",
    "unyank",
    "yank",
]
