"""Registries on object storage: `s3://bucket/prefix` against a real S3-protocol server (moto over HTTP, through
s3fs), with concurrent publishers and publishers killed with SIGKILL; `memory://` runs the yank tests
(test_hub_yank.py).

moto checks `If-None-Match` and stores the object in two steps without a lock, where S3 makes a conditional write
atomic; the test server therefore handles one request at a time (the publishers still run concurrently).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import uuid

import pytest
from hub_server import (
    REPO,
    creates_that_won,
    error_line,
    lpeft,
    publish,
    publisher,
    versions,
    yank_concurrently,
    yank_pull_and_republish,
)

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

SECRET = "testing-secret-never-stored"


class S3Server:
    """moto's S3 over HTTP on a free port; `kill_on` SIGKILLs a process when a request matches (mid-upload)."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self._app = DomainDispatcherApplication(create_backend_app)
        self._lock = threading.Lock()
        self.kill_on: tuple[str, int] | None = None  # (path fragment of a PUT, pid)
        self.killed = threading.Event()
        self._server = make_server("127.0.0.1", 0, self._handle, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _handle(self, environ, start_response):
        kill_on = self.kill_on
        if kill_on and environ["REQUEST_METHOD"] == "PUT" and kill_on[0] in environ.get("PATH_INFO", ""):
            self.kill_on = None
            os.kill(kill_on[1], signal.SIGKILL)
            self.killed.set()
        with self._lock:
            return list(self._app(environ, start_response))

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """`s3://<new bucket>/team`, with credentials and the endpoint in the environment only (as a user sets them)."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server.url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import s3fs

    bucket = f"lpeft-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket)
    return f"s3://{bucket}/team"


def stored_objects(registry):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = registry.removeprefix("s3://").split("/")[0]
    return {path: fs.cat_file(path) for path in fs.find(bucket)}


def test_publish_pull_list_yank_through_the_cli(adapter, s3, tmp_path):
    for version in ("1.0.0", "1.1.0"):
        result = publish(adapter, s3, version)
        assert result.exit_code == 0, result.output
    assert versions(s3) == ["1.0.0", "1.1.0"]
    listing = lpeft("list", "--registry", s3, "--json")
    assert listing.exit_code == 0, listing.output
    assert [row["repo_id"] for row in json.loads(listing.stdout)] == [REPO]
    found = lpeft("search", "--base", "acme-labs/tiny", "--registry", s3, "--json")
    assert found.exit_code == 0, found.output
    assert [(row["repo_id"], row["version"]) for row in json.loads(found.stdout)] == [(REPO, "1.1.0")]
    assert json.loads(lpeft("search", "--base", "other/base", "--registry", s3, "--json").stdout) == []

    yank_pull_and_republish(adapter, s3, tmp_path)

    stored = stored_objects(s3)
    assert not [p for p in stored if "/.staging/" in p]  # staging is cleaned up after each publish
    assert any(p.endswith("team/acme/capitals/1.0.0/lpeft_manifest.json") for p in stored)  # the folder layout
    assert not [p for p, data in stored.items() if SECRET.encode() in data or b"testing" in data]


@pytest.mark.timeout(600)
def test_eight_concurrent_publishers_of_different_versions_all_land(adapter, s3):
    procs = {f"2.{i}.0": publisher(adapter, s3, f"2.{i}.0") for i in range(8)}
    results = {version: (proc.wait(timeout=500), proc.stderr.read()) for version, proc in procs.items()}
    assert all(code == 0 for code, _ in results.values()), results
    assert versions(s3) == sorted(procs)


@pytest.mark.timeout(600)
def test_two_publishers_of_one_version_one_wins_one_clear_error(adapter, s3):
    procs = [publisher(adapter, s3, "3.0.0") for _ in range(2)]
    results = sorted((proc.wait(timeout=500), proc.stderr.read().strip()) for proc in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert results[1][1].splitlines()[-1] == (
        f"lpeft: error: {REPO} 3.0.0 is already published in registry {s3}; published versions are immutable."
    )
    assert versions(s3) == ["3.0.0"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "killed_at",
    [
        "/.staging/",  # uploading: nothing is visible, the version is free again
        "/acme/capitals/4.0.0/adapter_config.json",  # copying into place after the claim: the next publish finishes the commit
    ],
)
def test_a_publisher_killed_mid_upload_leaves_the_registry_consistent(adapter, s3, s3_server, killed_at, tmp_path):
    assert publish(adapter, s3, "1.0.0").exit_code == 0
    proc = publisher(adapter, s3, "4.0.0")
    s3_server.kill_on = (killed_at, proc.pid)
    proc.wait(timeout=500)
    assert s3_server.killed.is_set() and proc.returncode == -signal.SIGKILL
    s3_server.killed.clear()
    assert versions(s3) == ["1.0.0"]  # no partial version is visible

    result = publish(adapter, s3, "4.0.0")
    if killed_at == "/.staging/":
        assert result.exit_code == 0, result.output  # the retry publishes
    else:
        assert result.exit_code == 2 and "4.0.0 is already published" in error_line(result)  # rolled forward
    assert publish(adapter, s3, "4.1.0").exit_code == 0  # and the next publish works
    assert versions(s3) == ["1.0.0", "4.0.0", "4.1.0"]
    result = lpeft("pull", f"{REPO}@4.0.0", "--to", tmp_path / "pulled", "--registry", s3)  # verified: complete
    assert result.exit_code == 0, result.output


def test_a_storage_without_conditional_writes_is_refused():
    result = lpeft("versions", REPO, "--registry", "ftp://example.invalid/registry")
    assert result.exit_code == 2
    assert "has no conditional writes" in error_line(result)


def test_the_claim_is_a_conditional_create_on_the_server(s3):
    """The race the early check cannot settle: both publishers passed it; the server's If-None-Match picks one."""
    from lightning_peft.hub.fsspec_registry import FsspecRegistry

    assert creates_that_won(FsspecRegistry(s3), 8) == 1


def test_yank_updates_are_compare_and_swap(s3):
    from lightning_peft.hub.fsspec_registry import FsspecRegistry

    yanked = [f"1.{i}.0" for i in range(6)]
    assert yank_concurrently(FsspecRegistry(s3), yanked) == yanked  # no update lost


def test_file_urls_are_local_folders(tmp_path):
    from lightning_peft.hub.registries import get_registry
    from lightning_peft.hub.registry import LocalRegistry

    registry = get_registry(f"file://{tmp_path}/reg")
    assert isinstance(registry, LocalRegistry) and registry.root == tmp_path / "reg"
