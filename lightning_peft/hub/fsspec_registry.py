"""Any fsspec URL with conditional writes as a registry (`s3://bucket/prefix`, `gs://bucket/prefix`,
`az://container/prefix`, `memory://team`), laid out as the local folder:
`<url>/<org>/<name>/<version>/<files>` and `<url>/<org>/<name>/yanked.json`.

Object storage has no rename and no file lock, so a publish is made atomic with conditional writes:
1. every file is uploaded under `<url>/.staging/<publish id>/` (a publisher killed here leaves only staging);
2. the publisher claims the version by creating `<org>/<name>/<version>/.claim.json` with a conditional create
   (conditional.py: S3 and Azure `If-None-Match: *`, GCS `ifGenerationMatch=0`): of two publishers of one
   version exactly one create succeeds, the other is told the version exists; publishers of different versions
   never touch the same key;
3. the staged files are copied into the version folder server-side, the manifest last. The manifest is the
   commit marker: readers see only versions whose manifest exists, so a version appears completely or not at
   all. A claim without a manifest (its publisher died during the copy) is finished from its staging by the
   next publish of that version (or of any version of the repo once the claim is 10 minutes old): the claim
   is only written once the staging upload is complete, and the copies are idempotent.
A publisher killed while uploading leaves only its `.staging/<publish id>/` (invisible); every publish removes the
staging of publishes that started more than a day ago (the publish id begins with its UTC start time), and drops a
claim whose staging is gone that way, so its version can be published again.
Yanks are read with their ETag (GCS: generation) and written back only if unchanged, retried when another writer
came first.
Credentials and endpoints come from the storage's own configuration (S3: `AWS_*` variables, ~/.aws,
`AWS_ENDPOINT_URL`; GCS: `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's default credentials, `STORAGE_EMULATOR_HOST`;
Azure: `AZURE_STORAGE_CONNECTION_STRING`, or `AZURE_STORAGE_ACCOUNT_NAME` with `AZURE_STORAGE_ACCOUNT_KEY` or a
default Azure credential); nothing here writes them anywhere.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.errors import ConfigError, DataError, MissingDependencyError
from lightning_peft.hub import conditional
from lightning_peft.hub import yanks as yanks_lib
from lightning_peft.hub.manifest import MANIFEST_FILE, check_relative_path, dumps
from lightning_peft.hub.registry import Registry, VersionInfo, YankChange

if TYPE_CHECKING:
    from semver import Version

CLAIM_FILE = ".claim.json"
STAGING = ".staging"
_CLAIM_GRACE_S = 600  # a claim older than this whose version has no manifest: its publisher died
_STAGING_GRACE_S = 24 * 3600  # staging older than this: its publisher died (no upload takes a day)
_PUBLISH_TIME = "%Y%m%dT%H%M%S"  # the start of a publish id, in UTC
# The extra that installs each protocol's filesystem.
_EXTRAS = dict.fromkeys(conditional.GCS_PROTOCOLS, "gcs") | dict.fromkeys(conditional.AZURE_PROTOCOLS, "azure")


class FsspecRegistry(Registry):
    """Packages on an fsspec filesystem with conditional writes: S3, GCS, Azure Blob, `memory://` (all tested)."""

    kind = "fsspec"

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.protocol = url.partition("://")[0].lower()
        if self.protocol not in conditional.PROTOCOLS:  # checked before connecting
            raise ConfigError(
                f"`--registry`={url!r}: {self.protocol}:// has no conditional writes known to lightning-peft, so "
                "concurrent publishes could not be made safe; use s3://, gs://, az:// (abfs://) or a folder."
            )
        extra = _EXTRAS.get(self.protocol, "s3")
        try:
            from fsspec.core import url_to_fs

            # A filesystem of its own, not fsspec's cached instance: that one keeps the endpoint and credentials
            # the environment held when it was first made (adlfs reads AZURE_STORAGE_CONNECTION_STRING, gcsfs the
            # key file, once), so a registry made later in the same process would talk to a stale storage.
            self.fs, root = url_to_fs(self.url, skip_instance_cache=True)
        except (ImportError, ValueError) as err:
            raise MissingDependencyError(f"`--registry {url}`: {err}; pip install 'lightning-peft[{extra}]'") from None
        self.root = root.rstrip("/")
        self.writes = conditional.for_protocol(self.protocol, self.fs)

    def describe(self) -> str:
        return f"registry {self.url}"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # Reading
    def list_versions(self, repo_id: str) -> list[VersionInfo]:
        from lightning_peft.hub.versions import parse_version

        yanked = self.read_yanks(repo_id)
        found = []
        for folder in self._ls(self._path(repo_id)):
            name = folder.rstrip("/").rsplit("/", 1)[-1]
            try:
                version = parse_version(name)
            except ConfigError:
                continue
            raw = self._cat(f"{folder.rstrip('/')}/{MANIFEST_FILE}")
            if raw is None:
                continue  # not committed (yet): invisible
            data = _json(raw)
            where = f"{self.url}/{repo_id}/{name}"
            reason = yanks_lib.reason(yanked, version)
            found.append(VersionInfo(version, data.get("created_at"), data.get("message"), where, reason))
        return sorted(found, key=lambda info: info.version)

    def list_repos(self, base_model_id: str | None = None) -> list[str]:
        found = []
        for org in self._ls(self.root):
            org_name = org.rstrip("/").rsplit("/", 1)[-1]
            if org_name.startswith(".") or not self.fs.isdir(org):
                continue
            for repo in self._ls(org):
                repo_id = f"{org_name}/{repo.rstrip('/').rsplit('/', 1)[-1]}"
                if self.fs.isdir(repo) and self.list_versions(repo_id):
                    found.append(repo_id)
        return sorted(found)

    def read_manifest(self, repo_id: str, version: Version) -> bytes:
        raw = self._cat(self._path(repo_id, str(version), MANIFEST_FILE))
        if raw is None:
            raise ConfigError(f"{repo_id} {version} is not published in {self.describe()}.")
        return raw

    def download(self, repo_id: str, version: Version, paths: list[str], dest: Path) -> None:
        for rel in paths:
            check_relative_path(rel, where=f"{repo_id} {version}")
            raw = self._cat(self._path(repo_id, str(version), rel))
            if raw is None:
                raise DataError(
                    f"{repo_id} {version}: file {rel!r} listed in the manifest is missing from the registry."
                )
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(raw)

    def read_yanks(self, repo_id: str) -> dict[str, yanks_lib.Yank]:
        return yanks_lib.parse(self._cat(self._path(repo_id, yanks_lib.YANKED_FILE)), where=f"{self.url}/{repo_id}")

    # Writing
    def update_yanks(self, repo_id: str, change: YankChange, *, message: str) -> None:
        """Read `yanked.json` with its version token (ETag, GCS generation), apply `change`, write it back only if
        nobody wrote it since."""
        path = self._path(repo_id, yanks_lib.YANKED_FILE)
        for _ in range(20):
            raw, token = self.writes.read(path)
            updated = yanks_lib.dump(change(yanks_lib.parse(raw, where=f"{self.url}/{repo_id}")))
            if self.writes.replace(path, updated, token):
                return
            time.sleep(0.05)
        raise ConfigError(f"{self.describe()}: {repo_id}/{yanks_lib.YANKED_FILE} kept changing; try again.")

    def publish(self, repo_id: str, version: Version, package_dir: Path, *, message: str, private: bool) -> str:
        if private:
            raise ConfigError(f"`--private` applies to the Hugging Face Hub only; {self.describe()} has no visibility.")
        self._collect_staging()
        self._finish_claims(repo_id, version)
        target = self._path(repo_id, str(version))
        if self._cat(f"{target}/{MANIFEST_FILE}") is not None:
            raise self._exists(repo_id, version)
        publish_id = f"{time.strftime(_PUBLISH_TIME, time.gmtime())}-{uuid.uuid4().hex}"
        staging = self._path(STAGING, publish_id)
        files = sorted(p.relative_to(package_dir).as_posix() for p in package_dir.rglob("*") if p.is_file())
        for rel in files:  # 1. upload (the slow part): nothing of it is visible
            self.fs.put_file(str(package_dir / rel), f"{staging}/{rel}")
        claim = dumps({"staging": publish_id, "files": files, "claimed_at": time.time()})
        if not self.writes.create(f"{target}/{CLAIM_FILE}", claim):  # 2. one winner per version
            self.fs.rm(staging, recursive=True)
            raise self._exists(repo_id, version)
        self._commit(staging, target, files)  # 3. copy in place, manifest last
        return f"{self.url}/{repo_id}/{version}"

    def _commit(self, staging: str, target: str, files: list[str]) -> None:
        """Copy the staged files into place, the manifest last; idempotent, so two finishers may race."""
        try:
            for rel in sorted(files, key=lambda rel: rel == MANIFEST_FILE):
                self.fs.cp_file(f"{staging}/{rel}", f"{target}/{rel}")  # server-side
            self.fs.rm(staging, recursive=True)
        except FileNotFoundError:
            if self._cat(f"{target}/{MANIFEST_FILE}") is None:
                raise
            # another publish finished this commit (and removed the staging) first

    def _finish_claims(self, repo_id: str, version: Version) -> None:
        """Finish the commits of publishers that died after claiming a version (their staging is complete):
        the version being published at once (its publisher is retrying), the others once a claim is old enough
        that its publisher cannot still be copying."""
        for folder in self._ls(self._path(repo_id)):
            folder = folder.rstrip("/")
            claim = self._cat(f"{folder}/{CLAIM_FILE}")
            if claim is None or self._cat(f"{folder}/{MANIFEST_FILE}") is not None:
                continue
            data = _json(claim)
            fresh = time.time() - float(data.get("claimed_at") or 0) < _CLAIM_GRACE_S
            if fresh and not folder.endswith(f"/{version}"):
                continue
            staging = self._path(STAGING, str(data.get("staging")))
            if self._cat(f"{staging}/{MANIFEST_FILE}") is not None:  # uncached, unlike exists()
                self._commit(staging, folder, list(data.get("files", [])))
            elif _age(data.get("staging")) > _STAGING_GRACE_S and self._cat(f"{folder}/{MANIFEST_FILE}") is None:
                self._remove(f"{folder}/{CLAIM_FILE}")  # its staging was collected: the version is free again

    def _collect_staging(self) -> None:
        """Remove the staging of publishes that started more than `_STAGING_GRACE_S` ago: their publishers died
        (a finished publish removes its own). A claim still naming one is dropped by `_finish_claims`."""
        for entry in self._ls(self._path(STAGING)):
            if _age(entry.rstrip("/").rsplit("/", 1)[-1]) > _STAGING_GRACE_S:
                self._remove(entry)

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # another publish removed it first
            self.fs.rm(path, recursive=True)

    def _exists(self, repo_id: str, version: Version) -> ConfigError:
        return ConfigError(
            f"{repo_id} {version} is already published in {self.describe()}; published versions are immutable."
        )

    # Storage primitives
    def _ls(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)  # other processes write here: a cached listing may be stale
        try:
            return [str(p) for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def _cat(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None


def is_fsspec_url(text: str) -> bool:
    """`s3://...`, `memory://...`: a scheme that is not http(s) (the Hub) or file (a local folder)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() not in ("http", "https", "file")


def _age(publish_id: object) -> float:
    """Seconds since the publish `publish_id` (`<UTC start>-<random>`) started; 0 when the id has no time."""
    try:
        started = calendar.timegm(time.strptime(str(publish_id)[:15], _PUBLISH_TIME))
    except ValueError:
        return 0.0
    return time.time() - started


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
