"""`lpeft yank | unyank` (PEP 592 semantics) on both registries: the local folder and the Hub (FakeHub, HTTP)."""

from __future__ import annotations

import json

import pytest
from hub_server import error_line, lpeft

from lightning_peft.errors import ConfigError
from lightning_peft.hub import list_versions, pull, unyank, yank
from lightning_peft.hub.manifest import MANIFEST_FILE

REPO = "acme/capitals"
BASE_ID = ("--base-model-id", "acme-labs/tiny")


@pytest.fixture(params=["local", "hf", "memory"])
def registry(request, tmp_path):
    """A `--registry` value with 1.0.0, 1.1.0 and 1.2.0 of REPO published."""
    values = {"hf": lambda: request.getfixturevalue("hub").url, "memory": lambda: f"memory://{tmp_path.name}/reg"}
    value = values.get(request.param, lambda: str(tmp_path / "registry"))()
    adapter = request.getfixturevalue("adapter")
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        result = lpeft("publish", adapter, REPO, "--registry", value, "--version", version, "--no-verify", *BASE_ID)
        assert result.exit_code == 0, result.output
    return value


def pulled_version(folder):
    return json.loads((folder / MANIFEST_FILE).read_text())["version"]


def test_ranges_skip_a_yanked_version_and_exact_pulls_warn(registry, tmp_path):
    result = lpeft("yank", f"{REPO}@1.2.0", "--reason", "trained on the wrong split", "--registry", registry)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Yanked {REPO} 1.2.0: trained on the wrong split"

    for spec in ("", "@latest", "@^1", "@~1", "@>=1,<2", "@1"):
        result = lpeft("pull", f"{REPO}{spec}", "--to", tmp_path / f"p{spec}", "--registry", registry)
        assert result.exit_code == 0, result.output
        assert pulled_version(tmp_path / f"p{spec}") == "1.1.0", spec  # 1.2.0 is never chosen by a range

    result = lpeft("pull", f"{REPO}@~1.2", "--to", tmp_path / "patch-line", "--registry", registry)
    assert result.exit_code == 2 and "1.2.0 (yanked)" in error_line(result)  # only 1.2.0 is in ~1.2
    result = lpeft("pull", f"{REPO}@1.2.0", "--to", tmp_path / "exact", "--registry", registry)
    assert result.exit_code == 0, result.output
    assert pulled_version(tmp_path / "exact") == "1.2.0"  # reproducible: the exact version still pulls
    assert "lpeft: warning: acme/capitals 1.2.0 is yanked (trained on the wrong split)" in result.stderr

    listing = lpeft("versions", REPO, "--registry", registry).stdout.splitlines()
    assert listing[0].startswith("1.2.0  (yanked: trained on the wrong split)")
    assert listing[1].startswith("1.1.0  (latest)")


def test_unyank_restores_the_version(registry, tmp_path):
    yank(f"{REPO}@1.2.0", "bad", registry=registry)
    assert [i.yanked for i in list_versions(REPO, registry=registry)] == [None, None, "bad"]
    info = unyank(f"{REPO}@1.2.0", registry=registry)
    assert info.yanked is None
    assert pull(f"{REPO}@^1", tmp_path / "p", registry=registry).version == "1.2.0"
    assert lpeft("unyank", f"{REPO}@1.2.0", "--registry", registry).exit_code == 2  # not yanked any more


def test_every_version_yanked_is_a_clear_error(registry, tmp_path):
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        yank(f"{REPO}@{version}", "recalled", registry=registry)
    result = lpeft("pull", f"{REPO}@^1", "--to", tmp_path / "p", "--registry", registry)
    assert result.exit_code == 2
    assert error_line(result) == (
        "lpeft: error: No published version satisfies '^1'; published: 1.0.0 (yanked), 1.1.0 (yanked), 1.2.0 (yanked)."
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [f"{REPO}@9.9.9", "--reason", "x"],
            f"lpeft: error: {REPO} 9.9.9 is not published in * (published: 1.0.0, 1.1.0, 1.2.0).",
        ),
        ([f"{REPO}@1.2.0"], "lpeft: error: `--reason` is required to yank acme/capitals 1.2.0: *"),
        ([f"{REPO}@1.2.0", "--reason", "  "], "lpeft: error: `--reason` is required to yank acme/capitals 1.2.0: *"),
        ([REPO, "--reason", "x"], "lpeft: error: `lpeft yank` needs one exact version: acme/capitals@X.Y.Z, *"),
        ([f"{REPO}@^1", "--reason", "x"], "lpeft: error: `REPO_ID@VERSION`='^1' is not a semantic version*"),
    ],
)
def test_yank_errors_are_one_line(registry, args, message):
    import fnmatch

    result = lpeft("yank", *args, "--registry", registry)
    assert result.exit_code == 2, result.output
    assert fnmatch.fnmatch(error_line(result), message), error_line(result)
    assert all(i.yanked is None for i in list_versions(REPO, registry=registry))  # nothing was recorded


def test_local_yank_leaves_the_version_folder_unchanged(adapter, tmp_path):
    registry = tmp_path / "registry"
    assert lpeft("publish", adapter, REPO, "--registry", registry, "--no-verify", *BASE_ID).exit_code == 0
    before = {p: p.read_bytes() for p in (registry / REPO / "1.0.0").iterdir()}
    yank(f"{REPO}@1.0.0", "superseded", registry=registry)
    assert {p: p.read_bytes() for p in (registry / REPO / "1.0.0").iterdir()} == before
    record = json.loads((registry / REPO / "yanked.json").read_text())
    assert record["versions"]["1.0.0"]["reason"] == "superseded"
    with pytest.raises(ConfigError, match="not yanked"):
        unyank(f"{REPO}@1.0.0", registry=registry) and unyank(f"{REPO}@1.0.0", registry=registry)


def test_hub_yank_is_one_commit_and_the_tag_stays(hub, adapter):
    registry = hub.url
    assert lpeft("publish", adapter, REPO, "--registry", registry, "--no-verify", *BASE_ID).exit_code == 0
    tags = dict(hub.repos[REPO].tags)
    yank(f"{REPO}@1.0.0", "superseded", registry=registry)
    commits = hub.user_commits(REPO)
    assert len(commits) == 2 and commits[-1].title == "Yank capitals 1.0.0: superseded"
    assert set(commits[-1].files) - set(commits[0].files) == {"yanked.json"}
    assert hub.repos[REPO].tags == tags
    # A later publish keeps the record (it deletes only the files of the previous version).
    assert (
        lpeft("publish", adapter, REPO, "--registry", registry, "--bump", "patch", "--no-verify", *BASE_ID).exit_code
        == 0
    )
    assert "yanked.json" in hub.user_commits(REPO)[-1].files
    assert [i.yanked for i in list_versions(REPO, registry=registry)] == ["superseded", None]


def test_a_damaged_yank_record_is_named(adapter, tmp_path):
    registry = tmp_path / "registry"
    assert lpeft("publish", adapter, REPO, "--registry", registry, "--no-verify", *BASE_ID).exit_code == 0
    (registry / REPO / "yanked.json").write_text('{"versions": []}')
    result = lpeft("versions", REPO, "--registry", registry)
    assert result.exit_code == 3
    assert error_line(result).startswith(f"lpeft: error: {registry / REPO}: yanked.json is damaged")


def test_a_registry_written_before_yanks_still_pulls_and_says_it_cannot_yank(adapter, tmp_path):
    from lightning_peft.hub import LocalRegistry, Registry, list_adapters

    class OldStyle(Registry):  # implements only the methods a registry had before list and yank
        def __init__(self, inner):
            self.inner = inner

        def describe(self):
            return "old-style registry"

        def list_versions(self, repo_id):
            return self.inner.list_versions(repo_id)

        def publish(self, repo_id, version, package_dir, *, message, private):
            return self.inner.publish(repo_id, version, package_dir, message=message, private=private)

        def read_manifest(self, repo_id, version):
            return self.inner.read_manifest(repo_id, version)

        def download(self, repo_id, version, paths, dest):
            self.inner.download(repo_id, version, paths, dest)

    registry = OldStyle(LocalRegistry(tmp_path / "registry"))
    assert lpeft("publish", adapter, REPO, "--registry", tmp_path / "registry", "--no-verify", *BASE_ID).exit_code == 0
    assert pull(REPO, tmp_path / "p", registry=registry).version == "1.0.0"
    with pytest.raises(ConfigError, match="^old-style registry cannot record yanks; use a local folder or `hf`"):
        yank(f"{REPO}@1.0.0", "bad", registry=registry)
    with pytest.raises(ConfigError, match="^old-style registry cannot list its repos"):
        list_adapters(registry=registry)
