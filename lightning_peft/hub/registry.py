"""Registries behind one interface, and the local folder registry (the offline default).

A registry stores immutable versions of `org/name` packages. The local one keeps
`<root>/<org>/<name>/<version>/` folders and `<root>/index.json`:
- A version is staged in `<root>/.staging/` (same filesystem) and renamed into place: an interrupted publish
  leaves no partial version. The rename happens under a file lock (`<root>/.lock`) together with the index
  update, so concurrent publishes of different versions are safe, and the same version is refused.
- The folders are the truth; the index is a catalog (creation time, message) that a publish reconciles with
  them. Published files are made read-only.

The default folder is `$LPEFT_REGISTRY`, else `$XDG_DATA_HOME/lightning_peft/registry`
(`~/.local/share/lightning_peft/registry`). `registries.get_registry` turns a `--registry` value into a registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.atomic import fsync_dir, fsync_tree, write_bytes
from lightning_peft.errors import ConfigError, DataError
from lightning_peft.hub import yanks as yanks_lib
from lightning_peft.hub.manifest import MANIFEST_FILE, check_relative_path, dumps, read

if TYPE_CHECKING:
    from semver import Version

INDEX_FILE = "index.json"
INDEX_FORMAT = "lightning-peft/registry-index"
#: What `update_yanks` applies: the repo's yanks (version → Yank) in, the new yanks out.
YankChange = Callable[[dict[str, yanks_lib.Yank]], dict[str, yanks_lib.Yank]]


@dataclass(frozen=True)
class VersionInfo:
    """A published version: when, why, where (a folder or a Hub commit), and why it was yanked (if it was)."""

    version: Version
    created_at: str | None = None
    message: str | None = None
    location: str | None = None
    yanked: str | None = None  # the reason; a yanked version resolves only when asked for exactly


class Registry(ABC):
    """Where packages are published and pulled from."""

    #: Short name for messages ("local", "hf").
    kind: str = ""

    @abstractmethod
    def describe(self) -> str:
        """Where this registry is, for messages."""

    @abstractmethod
    def list_versions(self, repo_id: str) -> list[VersionInfo]:
        """The published versions of `repo_id`, oldest first (empty when it does not exist)."""

    @abstractmethod
    def publish(self, repo_id: str, version: Version, package_dir: Path, *, message: str, private: bool) -> str:
        """Store `package_dir` as `version` of `repo_id` in one atomic step; return where it is.

        `package_dir` comes from `staging_area`, and is consumed.

        Raises:
            ConfigError: the version exists already (versions are immutable).
        """

    @abstractmethod
    def read_manifest(self, repo_id: str, version: Version) -> bytes:
        """The raw manifest of a published version."""

    @abstractmethod
    def download(self, repo_id: str, version: Version, paths: list[str], dest: Path) -> None:
        """Write the files `paths` (checked relative paths) of a published version into `dest`."""

    # Listing and yanking came later than the methods above: a registry written before them still works
    # (nothing yanked), and says plainly that it cannot list or yank.
    def list_repos(self, base_model_id: str | None = None) -> list[str]:
        """The repo ids this registry holds, sorted (narrowed to adapters of `base_model_id` where it can)."""
        raise ConfigError(f"{self.describe()} cannot list its repos; use a local folder or `hf` as `--registry`.")

    def read_yanks(self, repo_id: str) -> dict[str, yanks_lib.Yank]:
        """The yanked versions of `repo_id` (version string → why), empty when none is."""
        return {}

    def update_yanks(self, repo_id: str, change: YankChange, *, message: str) -> None:
        """Apply `change` to the yanks of `repo_id` and record the result in one step (a commit on the Hub)."""
        raise ConfigError(f"{self.describe()} cannot record yanks; use a local folder or `hf` as `--registry`.")

    @contextlib.contextmanager
    def staging_area(self) -> Iterator[Path]:
        """A scratch folder to build packages in, removed afterwards."""
        folder = Path(tempfile.mkdtemp(prefix="lpeft-package-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def check_repo_id(repo_id: str, *, option: str = "REPO_ID", need_namespace: bool = True) -> str:
    """Validate `org/name` with huggingface_hub's own rules (both registries use them).

    Raises:
        ConfigError: naming the value and the rules.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"`{option}`={repo_id!r} is not a valid repo id: {err}") from None
    if need_namespace and repo_id.count("/") != 1:
        raise ConfigError(f"`{option}`={repo_id!r} must be 'org/name' (a namespace, a slash and a name).")
    return repo_id


def default_registry_root() -> Path:
    if os.environ.get("LPEFT_REGISTRY"):
        return Path(os.environ["LPEFT_REGISTRY"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "lightning_peft" / "registry"


class LocalRegistry(Registry):
    """Packages in a folder: `<root>/<org>/<name>/<version>/` plus `<root>/index.json`."""

    kind = "local"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"local registry {self.root}"

    def _version_dir(self, repo_id: str, version: Version | str) -> Path:
        return self.root / repo_id / str(version)

    @contextlib.contextmanager
    def staging_area(self) -> Iterator[Path]:
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="publish-", dir=staging_root))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def list_versions(self, repo_id: str) -> list[VersionInfo]:
        catalog = self._read_index().get(repo_id, {})
        yanked = self.read_yanks(repo_id)
        found = []
        for version, folder in self._scan(repo_id):
            entry = catalog.get(str(version)) or self._entry_from_manifest(folder)
            reason = yanks_lib.reason(yanked, version)
            found.append(VersionInfo(version, entry.get("created_at"), entry.get("message"), str(folder), reason))
        return sorted(found, key=lambda info: info.version)

    def list_repos(self, base_model_id: str | None = None) -> list[str]:
        """Every `org/name` folder holding a published version (the folders are the truth, not the index)."""
        if not self.root.is_dir():
            return []
        found = []
        for org in self.root.iterdir():
            if org.is_dir() and not org.name.startswith("."):
                found += [f"{org.name}/{name.name}" for name in org.iterdir() if name.is_dir()]
        return sorted(repo for repo in found if self._scan(repo))

    def read_yanks(self, repo_id: str) -> dict[str, yanks_lib.Yank]:
        path = self.root / repo_id / yanks_lib.YANKED_FILE
        return yanks_lib.parse(path.read_bytes() if path.is_file() else None, where=str(path.parent))

    def update_yanks(self, repo_id: str, change: YankChange, *, message: str) -> None:
        """Rewrite `<root>/<org>/<name>/yanked.json` atomically, under the registry lock (version folders stay)."""
        from filelock import FileLock

        with FileLock(str(self.root / ".lock"), timeout=120):
            updated = change(self.read_yanks(repo_id))
            write_bytes(self.root / repo_id / yanks_lib.YANKED_FILE, yanks_lib.dump(updated))

    def _scan(self, repo_id: str) -> list[tuple[Version, Path]]:
        from lightning_peft.hub.versions import parse_version

        repo_dir = self.root / repo_id
        if not repo_dir.is_dir():
            return []
        found = []
        for folder in repo_dir.iterdir():
            if not (folder / MANIFEST_FILE).is_file():
                continue
            try:
                found.append((parse_version(folder.name), folder))
            except ConfigError:
                continue
        return found

    def publish(self, repo_id: str, version: Version, package_dir: Path, *, message: str, private: bool) -> str:
        from filelock import FileLock

        if private:
            raise ConfigError("`--private` applies to the Hugging Face Hub only; a local registry has no visibility.")
        target = self._version_dir(repo_id, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".lock"), timeout=120):
            if target.exists():
                raise ConfigError(
                    f"{repo_id} {version} is already published in {self.describe()}; published versions are immutable."
                )
            _make_read_only(package_dir)
            package_dir.chmod(0o755)  # mkdtemp made it private to this user
            fsync_tree(package_dir)
            os.rename(package_dir, target)  # never over an existing version (checked above, under the lock)
            fsync_dir(target.parent)
            self._update_index(repo_id)
        return str(target)

    def _update_index(self, repo_id: str) -> None:
        """Reconcile the index entries of `repo_id` with its folders (called under the lock)."""
        index = self._read_index()
        entries = index.setdefault(repo_id, {})
        for version, folder in self._scan(repo_id):
            entries.setdefault(str(version), self._entry_from_manifest(folder))
        data = {"format": INDEX_FORMAT, "repos": {k: dict(sorted(v.items())) for k, v in sorted(index.items())}}
        write_bytes(self.root / INDEX_FILE, dumps(data))  # readable to all who may read the registry

    def _read_index(self) -> dict[str, dict[str, Any]]:
        path = self.root / INDEX_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(
                f"{path} is not valid JSON ({err}); delete it and it is rebuilt at the next publish."
            ) from err
        return data.get("repos", {}) if isinstance(data, dict) else {}

    @staticmethod
    def _entry_from_manifest(folder: Path) -> dict[str, Any]:
        try:
            manifest = read(folder)
        except (OSError, DataError):
            return {}
        entry = {"created_at": manifest.created_at, "message": manifest.message}
        return entry | {"manifest_sha256": _sha256(folder / MANIFEST_FILE)}

    def read_manifest(self, repo_id: str, version: Version) -> bytes:
        path = self._version_dir(repo_id, version) / MANIFEST_FILE
        if not path.is_file():
            raise ConfigError(f"{repo_id} {version} is not published in {self.describe()}.")
        return path.read_bytes()

    def download(self, repo_id: str, version: Version, paths: list[str], dest: Path) -> None:
        source = self._version_dir(repo_id, version).resolve()
        for rel in paths:
            check_relative_path(rel, where=f"{repo_id} {version}")
            path = (source / rel).resolve()
            if source not in path.parents:  # a symlink inside the registry pointing elsewhere
                raise DataError(f"{repo_id} {version}: file {rel!r} resolves outside its version folder.")
            if not path.is_file():
                raise DataError(
                    f"{repo_id} {version}: file {rel!r} listed in the manifest is missing from the registry."
                )
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)


def _make_read_only(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _sha256(path: Path) -> str:
    from lightning_peft.hub.fingerprint import file_sha256

    return file_sha256(path)
