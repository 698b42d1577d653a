"""The Hugging Face Hub registry, with the real huggingface_hub client against the fake Hub in hub_server.py."""

from __future__ import annotations

import json
import socket

import huggingface_hub
import pytest
from hub_server import error_line, lpeft, make_adapter

from lightning_peft.hub.manifest import MANIFEST_FILE

REPO = "acme/capitals"


def files_under(folder):
    return [p for p in folder.rglob("*") if p.is_file()]


def test_publish_versions_pull_round_trip_over_http(hub, adapter, tmp_path, tiny_model_dir):
    result = lpeft("publish", adapter, REPO, "--registry", "hf", "-m", "first", "--base-model-id", "acme-labs/tiny")
    assert result.exit_code == 0, result.output
    assert f"to {hub.url}/{REPO}/tree/v1.0.0" in result.stdout
    result = lpeft(
        "publish", adapter, REPO, "--registry", "hf", "--bump", "minor", "--no-verify", "--out", tmp_path / "pkg"
    )
    assert result.exit_code == 0, result.output

    commits = hub.user_commits(REPO)
    assert [c.title for c in commits] == ["capitals v1.0.0", "capitals v1.1.0"]  # one commit per publish
    assert commits[0].description == "first"
    assert hub.repos[REPO].tags == {"v1.0.0": commits[0].oid, "v1.1.0": commits[1].oid}  # one tag per publish
    assert [r for r in hub.requests if r[1].endswith("/commit/main")] == [
        ("POST", f"/api/models/{REPO}/commit/main")
    ] * 2
    manifest = json.loads(commits[1].files[MANIFEST_FILE])
    assert set(commits[1].files) == {".gitattributes", MANIFEST_FILE, *(f["path"] for f in manifest["files"])}
    for entry in manifest["files"]:
        assert commits[1].files[entry["path"]] == (tmp_path / "pkg" / entry["path"]).read_bytes()

    listing = lpeft("versions", REPO, "--registry", "hf")
    assert listing.stdout.split() == ["1.1.0", "(latest)", "1.0.0"]

    result = lpeft("pull", f"{REPO}@^1.0", "--to", tmp_path / "pulled", "--registry", "hf", "--base", tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "Pulled acme/capitals 1.1.0" in result.stdout
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == sorted(set(commits[1].files) - {".gitattributes"})
    result = lpeft("pull", f"{REPO}@1.0.0", "--to", tmp_path / "old", "--registry", hub.url)
    assert result.exit_code == 0 and json.loads((tmp_path / "old" / MANIFEST_FILE).read_text())["version"] == "1.0.0"

    # The token travels in headers only: no file written locally, and none uploaded, holds it.
    for path in files_under(tmp_path):
        assert hub.token.encode() not in path.read_bytes(), path
    for commit in hub.repos[REPO].commits:
        assert all(hub.token.encode() not in data for data in commit.files.values())


def test_a_version_commit_drops_files_the_new_version_lacks(hub, adapter, tiny_model_dir, tmp_path):
    assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify").exit_code == 0
    bare = make_adapter(tmp_path / "bare", tiny_model_dir)  # no run files, so no loss curve
    assert lpeft("publish", bare, REPO, "--registry", "hf", "--bump", "patch", "--no-verify").exit_code == 0
    first, second = hub.user_commits(REPO)
    assert "loss_curve.png" in first.files and "loss_curve.png" not in second.files


def test_private_repo(hub, adapter, monkeypatch, tmp_path):
    assert lpeft("publish", adapter, REPO, "--registry", "hf", "--private", "--no-verify").exit_code == 0
    assert hub.repos[REPO].private
    monkeypatch.delenv("HF_TOKEN")
    result = lpeft("pull", REPO, "--to", tmp_path / "p", "--registry", "hf")
    assert result.exit_code == 2 and "acme/capitals has no published version" in error_line(result)


def test_republishing_a_version_is_refused(hub, adapter):
    assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify").exit_code == 0
    result = lpeft("publish", adapter, REPO, "--registry", "hf", "--version", "1.0.0", "--no-verify")
    assert result.exit_code == 2 and "1.0.0 is already published" in error_line(result)
    assert len(hub.user_commits(REPO)) == 1


def test_no_token(hub, adapter, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify")
    assert result.exit_code == 2
    assert f"Publishing to the Hugging Face Hub at {hub.url} needs a token: set `HF_TOKEN`" in error_line(result)
    assert REPO not in hub.repos and all(method == "GET" for method, _ in hub.requests)


def test_wrong_token(hub, adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    result = lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify")
    assert result.exit_code == 2 and "(HTTP 401)" in error_line(result) and "Check the token" in error_line(result)
    assert REPO not in hub.repos


@pytest.mark.parametrize("repo_id", ["acme/bad name", "acme/x--y", "no-namespace"])
def test_invalid_repo_id_fails_before_any_request(hub, adapter, repo_id):
    result = lpeft("publish", adapter, repo_id, "--registry", "hf")
    assert result.exit_code == 2 and f"`REPO_ID`={repo_id!r}" in error_line(result)
    assert hub.requests == []


def test_unreachable_endpoint(adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_nobody")
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for args in (["publish", adapter, REPO, "--no-verify"], ["pull", REPO, "--to", tmp_path / "p"], ["versions", REPO]):
        result = lpeft(*args, "--registry", url)
        assert result.exit_code == 2, result.output
        assert f"Cannot reach the Hugging Face Hub at {url} (ConnectError" in error_line(result)
    assert not (tmp_path / "p").exists()


def test_offline_mode_is_a_clear_error(adapter, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = lpeft("versions", REPO, "--registry", "hf")
    assert result.exit_code == 2 and "`HF_HUB_OFFLINE` is set" in error_line(result)


def test_tampered_file_on_pull_lands_nothing(hub, adapter, tmp_path):
    assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify").exit_code == 0
    original = hub.repos[REPO].commit(hub.repos[REPO].tags["v1.0.0"]).files["adapter_config.json"]
    hub.tamper(REPO, "v1.0.0", "adapter_config.json", original.replace(b'"r": 2', b'"r": 3'))
    result = lpeft("pull", REPO, "--to", tmp_path / "out" / "pulled", "--registry", "hf")
    assert result.exit_code == 3 and "file 'adapter_config.json' fails its checksum" in error_line(result)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_manifest_path_escaping_the_folder_is_never_requested(hub, adapter, tmp_path):
    assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify").exit_code == 0
    commit = hub.repos[REPO].commit(hub.repos[REPO].tags["v1.0.0"])
    manifest = json.loads(commit.files[MANIFEST_FILE])
    manifest["files"].append({"path": "../../outside.txt", "sha256": "0" * 64, "size": 1})
    hub.tamper(REPO, "v1.0.0", MANIFEST_FILE, json.dumps(manifest).encode())
    result = lpeft("pull", REPO, "--to", tmp_path / "out" / "pulled", "--registry", "hf")
    assert result.exit_code == 3 and "'../../outside.txt' escapes the package folder" in error_line(result)
    assert not any("outside" in path for _, path in hub.requests)
    assert not (tmp_path / "out").exists()


def test_a_patch_to_an_older_line_leaves_main_on_the_highest_version(hub, adapter, tmp_path):
    for version in ("1.0.0", "2.0.0", "1.0.1"):
        assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify", "--version", version).exit_code == 0
    repo = hub.repos[REPO]
    assert repo.branches == {"main": repo.tags["v2.0.0"]}  # the release branch of 1.0.1 is gone, main unmoved
    assert json.loads(repo.commit(repo.tags["v1.0.1"]).files[MANIFEST_FILE])["version"] == "1.0.1"
    assert json.loads(repo.commit(repo.branches["main"]).files[MANIFEST_FILE])["version"] == "2.0.0"
    assert lpeft("versions", REPO, "--registry", "hf").stdout.split()[:4] == ["2.0.0", "(latest)", "1.0.1", "1.0.0"]
    result = lpeft("pull", f"{REPO}@~1.0", "--to", tmp_path / "patch", "--registry", "hf")
    assert result.exit_code == 0 and "Pulled acme/capitals 1.0.1" in result.stdout, result.output


def test_a_release_branch_left_by_a_killed_publish_does_not_block_the_next_one(hub, adapter):
    for version in ("1.0.0", "2.0.0"):
        assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify", "--version", version).exit_code == 0
    repo = hub.repos[REPO]
    repo.branches["lpeft-release-v1.0.1"] = repo.tags["v1.0.0"]  # killed after creating its branch: no tag, no cleanup
    result = lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify", "--version", "1.0.1")
    assert result.exit_code == 0, result.output
    assert repo.branches == {"main": repo.tags["v2.0.0"]}  # the stale branch was used and removed
    assert json.loads(repo.commit(repo.tags["v1.0.1"]).files[MANIFEST_FILE])["version"] == "1.0.1"


def test_publishes_name_their_parent_commit_and_a_lost_race_is_prepared_again(hub, adapter, monkeypatch):
    from huggingface_hub import CommitOperationAdd, HfApi

    assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify").exit_code == 0
    real = HfApi.create_commit
    raced = []

    def create_commit(self, repo_id, operations, **kwargs):
        assert kwargs["parent_commit"] == hub.repos[repo_id].branches[kwargs["revision"]]
        if not raced:  # another publisher lands between this one's read of main and its commit
            raced.append(real(self, repo_id, [CommitOperationAdd("x", b"x")], commit_message="someone else"))
        return real(self, repo_id, operations, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify", "--bump", "minor").exit_code == 0
    titles = [c.title for c in hub.user_commits(REPO)]
    assert titles == ["capitals v1.0.0", "someone else", "capitals v1.1.0"]  # no interleaving: refused, redone
    # 1.0.0, someone else, 1.1.0 refused (412: main moved since its parent commit), 1.1.0 prepared again.
    assert hub.requests.count(("POST", f"/api/models/{REPO}/commit/main")) == 4
    assert "x" not in hub.repos[REPO].commit(hub.repos[REPO].tags["v1.1.0"]).files  # not part of the package


def test_pulls_go_through_the_hub_cache_and_a_second_pull_downloads_nothing(hub, adapter, tmp_path):
    assert lpeft("publish", adapter, REPO, "--registry", "hf", "--no-verify").exit_code == 0
    files = set(hub.repos[REPO].commit(hub.repos[REPO].tags["v1.0.0"]).files) - {".gitattributes"}

    def downloads(start):
        return [path for method, path in hub.requests[start:] if method == "GET" and "/resolve/" in path]

    start = len(hub.requests)
    assert lpeft("pull", f"{REPO}@1.0.0", "--to", tmp_path / "first", "--registry", "hf").exit_code == 0
    assert sorted(p.rsplit("/", 1)[-1] for p in downloads(start)) == sorted(files)  # each file once, by its commit
    cache = tmp_path / "hf-home" / "hub" / "models--acme--capitals"
    assert cache.is_dir()

    start = len(hub.requests)
    result = lpeft("pull", f"{REPO}@1.0.0", "--to", tmp_path / "second", "--registry", "hf")
    assert result.exit_code == 0, result.output
    assert downloads(start) == []  # only metadata (refs, the tag's commit): every file came from the cache
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == sorted(files)
