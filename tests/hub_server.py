"""A small in-memory Hugging Face Hub for tests: the endpoints the real `huggingface_hub` client calls to
create a repo, commit files, tag, list refs and trees, and download files, and those `datasets` calls to load a
dataset repo — over real HTTP on 127.0.0.1.

Endpoints (as huggingface_hub 1.x/2.x calls them, see `hf_api.py`, `_commit_api.py`, `file_download.py`):
    POST /api/repos/create                              create_repo (409 when it exists)
    POST /api/validate-yaml                             the card's metadata check before a commit with README.md
    POST /api/models/{repo}/preupload/{rev}             answers "regular" for every file: contents come inline
    POST /api/models/{repo}/commit/{rev}                NDJSON: header, then file (base64) / deletedFile lines
    POST /api/models/{repo}/tag/{rev}                   create_tag (409 when it exists)
    GET  /api/models?filter=T&filter=U&search=S         list_models: the repos whose tags hold every filter (tags come
                                                        from README.md's metadata at main, as the Hub derives them)
    GET  /api/models/{repo}/refs                        list_repo_refs
    GET  /api/models/{repo}/tree/{rev}[/{path}]         list_repo_tree / list_repo_files
    GET  /api/models/{repo}/revision/{rev}              model_info / repo_info
    HEAD, GET /{repo}/resolve/{rev}/{path}              file metadata (ETag, X-Repo-Commit, size) and download
Dataset repos (`add_dataset`), as `datasets.load_dataset` reads them (through huggingface_hub's HfFileSystem):
    GET  /api/datasets/{repo}/revision/{rev}            dataset_info: the commit sha a branch or tag resolves to
    GET  /api/datasets/{repo}/tree/{rev}[/{path}]       folder listings ("directory" entries; ?recursive=true)
    HEAD, GET /datasets/{repo}/resolve/{rev}/{path}     the card (README.md, its `configs:` declare the subsets), files
Writes need `Authorization: Bearer <token>`; every request is recorded for assertions.

`make_adapter` and `write_run_files` build what the hub tests publish: a PEFT adapter on the tiny test model
saved as `lpeft fit` saves it (`<run>/adapter/`), and the run's Lightning files next to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@dataclass
class Commit:
    oid: str
    title: str
    description: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def commit(self, oid: str) -> Commit:
        return next(c for c in self.commits if c.oid == oid)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """The fake Hub's state and server. `start()` returns self; `url` is its endpoint."""

    def __init__(self, token: str = "hf_fake_write_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.datasets: dict[str, Repo] = {}  # dataset repos, a namespace of their own as on the Hub
        self.requests: list[tuple[str, str]] = []
        self.model_filters: list[list[str]] = []  # the `filter` tags of each list_models request
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- helpers for tests -------------------------------------------------------------------------------------
    def user_commits(self, repo_id: str) -> list[Commit]:
        """Commits made through /commit (not the repo's initial one)."""
        return self.repos[repo_id].commits[1:]

    def add_dataset(self, repo_id: str, files: dict[str, bytes], title: str = "initial commit") -> str:
        """Create the dataset repo `repo_id` or commit `files` (all of them, replacing the last) to its main branch.

        Returns the new commit's sha.
        """
        with self.lock:
            repo = self.datasets.setdefault(repo_id, Repo(private=False))
            commit = Commit(_oid("dataset", repo_id, str(len(repo.commits)), title), title, "", dict(files))
            repo.commits.append(commit)
            repo.branches["main"] = commit.oid
            return commit.oid

    def tamper(self, repo_id: str, tag: str, path: str, data: bytes) -> None:
        """Change a file in the tagged commit in place, as a compromised server or a corrupted store would."""
        with self.lock:
            repo = self.repos[repo_id]
            repo.commit(repo.tags[tag]).files[path] = data

    # -- endpoints ---------------------------------------------------------------------------------------------
    def create_repo(self, body: dict[str, Any]) -> dict[str, Any]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        initial = Commit(_oid(repo_id, "initial"), "initial commit", "", {".gitattributes": GITATTRIBUTES})
        repo = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
        repo.commits.append(initial)
        repo.branches["main"] = initial.oid
        self.repos[repo_id] = repo
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def commit(self, repo: Repo, repo_id: str, revision: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
        if revision not in repo.branches:
            raise HubError(404, f"Revision {revision} not found", "RevisionNotFound")
        header = lines[0]
        if header.get("key") != "header":
            raise HubError(400, "The first line must be the header")
        parent = header["value"].get("parentCommit")
        if parent and parent != repo.branches[revision]:  # the Hub's answer when the branch moved since `parent`
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commit(repo.branches[revision]).files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(400, f"Unsupported commit operation {key!r} (this fake Hub takes inline files only)")
        commit = Commit(
            _oid(repo_id, str(len(repo.commits)), header["value"]["summary"]),
            header["value"]["summary"],
            header["value"].get("description", ""),
            files,
        )
        repo.commits.append(commit)
        repo.branches[revision] = commit.oid
        return {
            "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}",
            "commitOid": commit.oid,
            "pullRequestUrl": None,
        }

    def tag(self, repo: Repo, revision: str, body: dict[str, Any]) -> dict[str, Any]:
        oid = self.resolve(repo, revision).oid
        if body["tag"] in repo.tags or body["tag"] in repo.branches:
            raise HubError(409, f"Tag {body['tag']} already exists")
        repo.tags[body["tag"]] = oid
        return {}

    def branch(self, repo: Repo, name: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """Create the branch `name` at `startingPoint` (body), or delete it (body None)."""
        if body is None:
            if name == "main" or repo.branches.pop(name, None) is None:
                raise HubError(404 if name != "main" else 403, f"Cannot delete branch {name}")
            return {}
        if name in repo.branches or name in repo.tags:
            raise HubError(409, f"Reference {name} already exists")
        repo.branches[name] = self.resolve(repo, body.get("startingPoint") or "main").oid
        return {}

    def refs(self, repo: Repo) -> dict[str, Any]:
        def ref(kind: str, name: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        return {
            "branches": [ref("heads", n, o) for n, o in repo.branches.items()],
            "converts": [],
            "tags": [ref("tags", n, o) for n, o in repo.tags.items()],
            "pullRequests": [],
        }

    def tree(self, repo: Repo, revision: str, prefix: str) -> list[dict[str, Any]]:
        files = self.resolve(repo, revision).files
        prefix = prefix.strip("/")
        return [
            {"type": "file", "oid": _blob_oid(data), "size": len(data), "path": path}
            for path, data in sorted(files.items())
            if not prefix or path == prefix or path.startswith(prefix + "/")
        ]

    def listing(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict[str, Any]]:
        """A folder's entries as the Hub's tree API lists them: files, and folders as "directory" entries."""
        files = self.resolve(repo, revision).files
        folder = folder.strip("/")
        under = {p: d for p, d in files.items() if not folder or p.startswith(folder + "/")}
        if folder and not under:
            raise HubError(404, f"{folder} does not exist at {revision}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(under.items()):
            parts = path[len(folder) + 1 if folder else 0 :].split("/")
            for depth in range(1, len(parts)):  # the folders between `folder` and the file
                if recursive or depth == 1:
                    name = "/".join(filter(None, [folder, *parts[:depth]]))
                    entries.setdefault(
                        name, {"type": "directory", "oid": _oid(revision, name), "size": 0, "path": name}
                    )
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": _blob_oid(data), "size": len(data), "path": path}
        return list(entries.values())

    def models(self, filters: list[str], search: str, authorized: bool) -> list[dict[str, Any]]:
        """`list_models`: public repos (and private ones for the token) carrying every tag in `filters`."""
        self.model_filters.append(filters)
        found = []
        for repo_id, repo in sorted(self.repos.items()):
            tags = _card_tags(repo.commit(repo.branches["main"]).files.get("README.md", b""))
            if (authorized or not repo.private) and set(filters) <= set(tags) and search.lower() in repo_id.lower():
                found.append({"id": repo_id, "modelId": repo_id, "tags": tags, "private": repo.private})
        return found

    def resolve(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision) or repo.tags.get(revision) or revision
        try:
            return repo.commit(oid)
        except StopIteration:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound") from None


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub
    query: dict[str, list[str]]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, self.query = url.path, parse_qs(url.query)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        with self.state.lock:
            self.state.requests.append((method, path))
            try:
                status, payload, headers = self._route(method, [unquote(p) for p in path.strip("/").split("/")], body)
            except HubError as err:
                status, payload = err.status, {"error": err.message, **err.extra}
                headers = {"X-Error-Code": err.code, "X-Error-Message": err.message} if err.code else {}
        self._send(method, status, payload, headers)

    def _route(self, method: str, parts: list[str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        hub = self.state
        if method == "POST" and parts == ["api", "repos", "create"]:
            self._require_token()
            return 200, hub.create_repo(json.loads(body)), {}
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return _validate_yaml(json.loads(body)["content"])
        if method == "GET" and parts == ["api", "models"]:
            search = self.query.get("search", [""])[0]
            return 200, hub.models(self.query.get("filter", []), search, self._authorized()), {}
        if len(parts) >= 5 and parts[:2] == ["api", "models"]:
            return self._api_repo(method, f"{parts[2]}/{parts[3]}", parts[4], parts[5:], body)
        if len(parts) >= 5 and parts[:2] == ["api", "datasets"] and method == "GET":
            return self._api_dataset(f"{parts[2]}/{parts[3]}", parts[4], parts[5:])
        if len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]), dataset=True)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"No route for {method} /{'/'.join(parts)}")

    def _api_repo(self, method: str, repo_id: str, action: str, rest: list[str], body: bytes) -> tuple[int, Any, dict]:
        hub, repo = self.state, self._repo(repo_id)
        if method == "POST":
            self._require_token()
            revision = rest[0] if rest else "main"
            if action == "preupload":
                files = json.loads(body)["files"]
                answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return 200, {"files": answer}, {}
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                return 200, hub.commit(repo, repo_id, revision, lines), {}
            if action == "tag":
                return 200, hub.tag(repo, revision, json.loads(body)), {}
            if action == "branch":
                return 200, hub.branch(repo, revision, json.loads(body or b"{}")), {}
        elif method == "DELETE" and action == "branch" and rest:
            self._require_token()
            return 200, hub.branch(repo, rest[0], None), {}
        elif action == "refs":
            return 200, hub.refs(repo), {}
        elif action == "tree" and rest:
            return 200, hub.tree(repo, rest[0], "/".join(rest[1:])), {}
        elif action == "revision" and rest:
            commit = hub.resolve(repo, rest[0])
            siblings = [{"rfilename": p} for p in sorted(commit.files)]
            return 200, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings}, {}
        raise HubError(404, f"No route for {method} {action}")

    def _api_dataset(self, repo_id: str, action: str, rest: list[str]) -> tuple[int, Any, dict]:
        hub, repo = self.state, self._repo(repo_id, dataset=True)
        if action == "tree" and rest:
            recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
            return 200, hub.listing(repo, rest[0], "/".join(rest[1:]), recursive), {}
        if action == "revision" and rest:
            commit = hub.resolve(repo, rest[0])
            siblings = [{"rfilename": p} for p in sorted(commit.files)]
            return 200, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings}, {}
        raise HubError(404, f"No route for GET datasets {action}")

    def _resolve(
        self, repo_id: str, revision: str, path: str, dataset: bool = False
    ) -> tuple[int, Any, dict[str, str]]:
        commit = self.state.resolve(self._repo(repo_id, dataset), revision)
        if path not in commit.files:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        data = commit.files[path]
        headers = {
            "ETag": f'"{_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
            "Content-Type": "application/octet-stream",
        }
        return 200, data, headers

    def _repo(self, repo_id: str, dataset: bool = False) -> Repo:
        repo = (self.state.datasets if dataset else self.state.repos).get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _require_token(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid username or password.")

    def _send(self, method: str, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)


def _validate_yaml(content: str) -> tuple[int, Any, dict[str, str]]:
    """The Hub's metadata check, reduced to what matters here: valid YAML, and base_model a Hub id."""
    import yaml

    if not content.startswith("---\n"):
        return 200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}, {}
    try:
        metadata = yaml.safe_load(content.split("---\n")[1])
    except yaml.YAMLError as err:
        return 400, {"errors": [{"message": f"Invalid YAML: {err}"}]}, {}
    base = metadata.get("base_model")
    if base is not None and (not isinstance(base, str) or base.startswith(("/", ".", "~")) or base.count("/") != 1):
        return 400, {"errors": [{"message": f'"base_model" must be a Hub model id, got {base!r}'}]}, {}
    return 200, {"warnings": []}, {}


def _card_tags(readme: bytes) -> list[str]:
    """The tags the Hub derives from a card: its `tags`, `library_name`, and `base_model:adapter:<id>`."""
    import yaml

    text = readme.decode("utf-8", "replace")
    metadata = yaml.safe_load(text.split("---\n")[1]) if text.startswith("---\n") else None
    if not isinstance(metadata, dict):
        return []
    tags = [*(metadata.get("tags") or []), *([metadata["library_name"]] if metadata.get("library_name") else [])]
    if metadata.get("base_model") and metadata.get("base_model_relation") == "adapter":
        tags.append(f"base_model:adapter:{metadata['base_model']}")
    return list(dict.fromkeys(tags))


def _blob_oid(data: bytes) -> str:
    """The git blob sha1, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _oid(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


# -- what the hub tests publish ----------------------------------------------------------------------------------
METRICS_CSV = """epoch,step,train_acc,train_loss,val_acc,val_loss,val_ppl
0,4,,2.5,,,
0,9,,1.75,,,
0,9,,,0.5,1.9,6.685894
0,9,0.4,,,,
1,14,,1.25,,,
1,19,,0.875,,,
1,19,,,0.625,1.5,4.481689
1,19,0.55,,,,
"""
HPARAMS_YAML = """learning_rate: 0.0002
optimizer: adamw
lr_scheduler: cosine
batch_size: 4
max_length: 128
packing: true
train_file: data/train.jsonl
val_file: data/val.jsonl
adapter: !!python/object:peft.tuners.lora.config.LoraConfig {r: 2}
"""


def make_adapter(folder, base_dir, *, seed: int = 0, **lora: Any):
    """Save a LoRA adapter (random, non-zero B so it changes the logits) on `base_dir` into `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 2, "target_modules": "all-linear", "init_lora_weights": False, **lora})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(folder)
    return folder


class _Booby:
    """Unpickling this creates a marker file: proof that a pickle was, or was not, loaded."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_only_adapter(source, folder, marker):
    """An adapter folder whose only weights are a pickle that creates `marker` when unpickled."""
    import pickle
    import shutil

    folder.mkdir()
    shutil.copy(source / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Booby(marker)))
    return folder


def write_run_files(run_dir) -> None:
    """The files Lightning's CSVLogger and LightningCLI leave in a run's log dir."""
    (run_dir / "metrics.csv").write_text(METRICS_CSV)
    (run_dir / "hparams.yaml").write_text(HPARAMS_YAML)


def lpeft(*args):
    """Run `lpeft` in-process (click's runner) with every argument as a string."""
    from click.testing import CliRunner

    from lightning_peft.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result):
    """The one-line `lpeft: error: ...` message a failed command ends with."""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("lpeft: error: "), result.output
    return lines[-1]


# -- publishing to a registry on object storage (test_hub_s3.py, test_hub_gcs_azure.py) -------------------------
REPO = "acme/capitals"
BASE_ID = ("--base-model-id", "acme-labs/tiny")
ROOT = Path(__file__).resolve().parents[1]


def publish(adapter, registry, version, *extra):
    return lpeft(
        "publish", adapter, REPO, "--registry", registry, "--version", version, "--no-verify", *BASE_ID, *extra
    )


def publisher(adapter, registry, version):
    """A publisher in its own process (`lpeft publish` as a user runs it)."""
    command = [sys.executable, "-m", "lightning_peft", "publish", str(adapter), REPO, "--registry", registry]
    command += ["--version", version, "--no-verify", *BASE_ID]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def versions(registry):
    result = lpeft("versions", REPO, "--registry", registry)
    assert result.exit_code == 0, result.output
    return sorted(line.split()[0] for line in result.stdout.splitlines() if line.strip())


def creates_that_won(registry, writers):
    """`writers` threads create one claim at once through the registry's conditional create: how many succeeded."""
    from concurrent.futures import ThreadPoolExecutor

    from lightning_peft.hub.fsspec_registry import CLAIM_FILE

    path = registry._path(REPO, "5.0.0", CLAIM_FILE)
    with ThreadPoolExecutor(writers) as pool:
        return sum(pool.map(lambda _: registry.writes.create(path, b"{}"), range(writers)))


def yank_concurrently(registry, versions_to_yank):
    """Yank each version from its own thread at once (read, change, conditional write-back, retry)."""
    from concurrent.futures import ThreadPoolExecutor

    from lightning_peft.hub import yanks as yanks_lib

    def yank(version):
        registry.update_yanks(REPO, lambda y: yanks_lib.changed(y, version, "bad", version), message="")

    with ThreadPoolExecutor(len(versions_to_yank)) as pool:
        list(pool.map(yank, versions_to_yank))
    return sorted(registry.read_yanks(REPO))


def yank_pull_and_republish(adapter, registry, tmp_path):
    """With 1.0.0 and 1.1.0 published: yanking 1.1.0 makes `^1` pull 1.0.0, and 1.0.0 cannot be published again."""
    assert lpeft("yank", f"{REPO}@1.1.0", "--reason", "wrong split", "--registry", registry).exit_code == 0
    result = lpeft("pull", f"{REPO}@^1", "--to", tmp_path / "pulled", "--registry", registry)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "pulled" / "lpeft_manifest.json").read_text())["version"] == "1.0.0"

    result = publish(adapter, registry, "1.0.0")  # immutable
    assert result.exit_code == 2
    assert "1.0.0 is already published" in error_line(result)
