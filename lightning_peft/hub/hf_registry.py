"""The Hugging Face Hub as a registry, through `huggingface_hub.HfApi`.

Each version is one commit that holds every file of the package (files of the previous version that the new one
lacks are deleted in that same commit), tagged `vX.Y.Z`. The commit names the commit it was prepared against
(`parent_commit`), so two concurrent publishers cannot interleave: the Hub refuses the later one, which prepares
again. The highest version is committed on `main`; a lower one (a patch to an older line) on a temporary branch
started at the highest tag below it, so `main` always holds the highest version; versions are listed from the tags and
downloaded at their tag. Yanks are one commit of `yanked.json` on `main` (the tags stay where they are), and
publishes keep that file. Listing and search ask `HfApi.list_models` for repos tagged `peft` and
`lightning-peft` (and `base_model:adapter:<id>`), the tags every published card carries. The endpoint is `HF_ENDPOINT` (or the URL given as `--registry`); the token comes
from the usual places (`HF_TOKEN`, `hf auth login`) through `huggingface_hub.get_token()`. It is only ever
sent in request headers: nothing here writes it anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_peft.errors import ConfigError, DataError
from lightning_peft.hub import yanks as yanks_lib
from lightning_peft.hub.manifest import MANIFEST_FILE, check_relative_path
from lightning_peft.hub.registry import Registry, VersionInfo, YankChange
from lightning_peft.hub.versions import tag_for, version_of_tag

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from semver import Version

# Files the Hub keeps in every repo that are not part of a package (a publish does not delete them).
_HUB_FILES = {".gitattributes", yanks_lib.YANKED_FILE}
# The tags that make a model repo a candidate for `list_repos`: what every published card carries.
_PACKAGE_TAGS = ("peft", "lightning-peft")


class HfRegistry(Registry):
    """Packages as tagged commits of model repos on a Hugging Face Hub."""

    kind = "hf"

    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        self._endpoint = endpoint
        self._token = token

    @property
    def endpoint(self) -> str:
        from huggingface_hub import constants

        return (self._endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")

    def describe(self) -> str:
        return f"the Hugging Face Hub at {self.endpoint}"

    def _api(self, *, need_token: bool) -> HfApi:
        from huggingface_hub import HfApi, get_token

        token = self._token or get_token()
        if need_token and not token:
            raise ConfigError(
                f"Publishing to {self.describe()} needs a token: set `HF_TOKEN` or run `hf auth login` "
                "(a token with write access)."
            )
        return HfApi(endpoint=self.endpoint, token=token or False)

    def list_versions(self, repo_id: str) -> list[VersionInfo]:
        from huggingface_hub.errors import RepositoryNotFoundError

        api = self._api(need_token=False)
        with self._errors(repo_id):
            try:
                refs = api.list_repo_refs(repo_id)
            except RepositoryNotFoundError:
                return []
        found = []
        for tag in refs.tags:
            version = version_of_tag(tag.name)
            if version is not None:
                found.append(VersionInfo(version, location=tag.target_commit))
        yanked = self.read_yanks(repo_id) if found else {}
        found = [replace(info, yanked=yanks_lib.reason(yanked, info.version)) for info in found]
        return sorted(found, key=lambda info: info.version)

    def list_repos(self, base_model_id: str | None = None) -> list[str]:
        tags = [*_PACKAGE_TAGS, *([f"base_model:adapter:{base_model_id}"] if base_model_id else [])]
        with self._errors("the model list"):
            return sorted(model.id for model in self._api(need_token=False).list_models(filter=tags))

    def read_yanks(self, repo_id: str, revision: str = "main") -> dict[str, yanks_lib.Yank]:
        from huggingface_hub.errors import EntryNotFoundError

        api = self._api(need_token=False)
        with tempfile.TemporaryDirectory(prefix="lpeft-yanked-") as folder, self._errors(repo_id):
            try:
                path = api.hf_hub_download(repo_id, yanks_lib.YANKED_FILE, revision=revision, local_dir=folder)
            except EntryNotFoundError:
                return {}
            raw = Path(path).read_bytes()
        return yanks_lib.parse(raw, where=f"{repo_id} on {self.describe()}")

    def update_yanks(self, repo_id: str, change: YankChange, *, message: str) -> None:
        """One commit of `yanked.json` on `main`, based on the commit it was read from (`parent_commit`)."""
        from huggingface_hub import CommitOperationAdd

        api = self._api(need_token=True)
        with self._errors(repo_id):
            head = api.repo_info(repo_id, revision="main").sha
            updated = change(self.read_yanks(repo_id, revision=head or "main"))
            operation = CommitOperationAdd(yanks_lib.YANKED_FILE, yanks_lib.dump(updated))
            api.create_commit(repo_id, [operation], commit_message=message, parent_commit=head)

    def publish(self, repo_id: str, version: Version, package_dir: Path, *, message: str, private: bool) -> str:
        """One commit with every file, based on the commit it was prepared against (`parent_commit`), then a tag.

        The highest version is committed on `main`. A release below it (a patch to an older line) is committed on
        a short-lived branch started at the highest tag below it and tagged there, so `main` keeps the newest.
        A publish that loses a race (the branch moved since it was read) is prepared again, up to 3 times.
        """
        from huggingface_hub.errors import HfHubHTTPError

        api = self._api(need_token=True)
        with self._errors(repo_id):
            api.create_repo(repo_id, private=private, exist_ok=True)
            for attempt in range(3):
                try:
                    return self._publish_once(api, repo_id, version, package_dir, message)
                except HfHubHTTPError as err:
                    if err.response is None or err.response.status_code != 412 or attempt == 2:
                        raise
        raise AssertionError("unreachable")  # the loop returns or raises

    def _publish_once(self, api: HfApi, repo_id: str, version: Version, package_dir: Path, message: str) -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        tag = tag_for(version)
        published = [info.version for info in self.list_versions(repo_id)]
        if version in published:
            raise ConfigError(
                f"{repo_id} {version} is already published (tag {tag}); published versions are immutable."
            )
        below = [v for v in published if v < version]
        branch = "main" if len(below) == len(published) else f"lpeft-release-{tag}"
        if branch != "main":  # an older line's release: start from the highest version below it, leave main alone
            # exist_ok: a publisher killed before its `finally` leaves the branch behind; with no tag for this
            # version it holds nothing published, and the commit below replaces its whole tree anyway.
            api.create_branch(repo_id, branch=branch, revision=tag_for(max(below)) if below else None, exist_ok=True)
        try:
            head = api.repo_info(repo_id, revision=branch).sha
            files = sorted(p.relative_to(package_dir).as_posix() for p in package_dir.rglob("*") if p.is_file())
            stale = set(api.list_repo_files(repo_id, revision=head)) - set(files) - _HUB_FILES
            operations: list[Any] = [CommitOperationAdd(path, str(package_dir / path)) for path in files]
            operations += [CommitOperationDelete(path) for path in sorted(stale)]
            commit = api.create_commit(
                repo_id,
                operations,
                commit_message=f"{repo_id.split('/')[-1]} {tag}",
                commit_description=message,
                revision=branch,
                parent_commit=head,
            )
            # Tag the commit just made (not the branch, which another publisher may have moved since).
            api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=message or None)
        finally:
            if branch != "main":
                api.delete_branch(repo_id, branch=branch)
        return f"{self.endpoint}/{repo_id}/tree/{tag}"

    def read_manifest(self, repo_id: str, version: Version) -> bytes:
        with tempfile.TemporaryDirectory(prefix="lpeft-manifest-") as folder:
            self.download(repo_id, version, [MANIFEST_FILE], Path(folder))
            return (Path(folder) / MANIFEST_FILE).read_bytes()

    def download(self, repo_id: str, version: Version, paths: list[str], dest: Path) -> None:
        """Through `snapshot_download` at the version's tag: parallel, resumable, and into the Hub cache, so a file
        already downloaded (the manifest, a version pulled before) is copied from there instead."""
        from huggingface_hub import snapshot_download

        where = f"{repo_id} {version}"
        for rel in paths:
            check_relative_path(rel, where=where)
        with self._errors(repo_id), _quiet_when_nothing_matches():
            snapshot = Path(
                snapshot_download(
                    repo_id,
                    revision=tag_for(version),
                    allow_patterns=[glob_escape(rel) for rel in paths],
                    endpoint=self.endpoint,
                    token=self._token or None,
                )
            )
        for rel in paths:
            source = snapshot / rel
            if not source.is_file():
                raise DataError(f"{where} on {self.describe()}: file {rel!r} listed in its manifest is missing.")
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest / rel)  # out of the cache (its entries are links to shared blobs)

    @contextlib.contextmanager
    def _errors(self, repo_id: str) -> Iterator[None]:
        """Turn network and Hub errors into one-line messages that say what to fix."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = self.describe()
        try:
            yield
        except OfflineModeIsEnabled:
            raise ConfigError(
                f"`HF_HUB_OFFLINE` is set, so {where} cannot be used; unset it or use a local registry."
            ) from None
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise ConfigError(f"{repo_id} was not found on {where} (or this token may not see it).") from None
        except LocalEntryNotFoundError as err:
            # hf_hub_download's answer when the server could not be reached and nothing is cached.
            raise ConfigError(
                f"Cannot download {repo_id} from {where} ({_first_line(err)}); check the network."
            ) from None
        except EntryNotFoundError as err:
            raise DataError(
                f"{repo_id} on {where}: a file listed in its manifest is missing ({_first_line(err)})."
            ) from None
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else "?"
            hint = " Check the token (`HF_TOKEN`) and its write access." if status in (401, 403) else ""
            raise ConfigError(
                f"{where} refused the request for {repo_id} (HTTP {status}): {_first_line(err)}.{hint}"
            ) from None
        except Exception as err:
            if not _is_transport_error(err):
                raise
            raise ConfigError(
                f"Cannot reach {where} ({type(err).__name__}: {_first_line(err)}); check `HF_ENDPOINT` / `--registry` "
                "and the network."
            ) from None


@contextlib.contextmanager
def _quiet_when_nothing_matches() -> Iterator[None]:
    """Drop snapshot_download's warning that no file matched: `download` says which file is missing itself, and
    an optional file (the signature of an unsigned package) is missing by design."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No files matched")

    logger = logging.getLogger("huggingface_hub._snapshot_download")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def glob_escape(path: str) -> str:
    """`path` as an fnmatch pattern that matches only itself (`allow_patterns` are fnmatch patterns)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _is_transport_error(err: BaseException) -> bool:
    """A connection that failed below HTTP. huggingface_hub has used requests, httpx and httpx2 over its versions,
    so the classes are recognised by name rather than imported."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "ConnectionError", "Timeout", "TimeoutException"}
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
