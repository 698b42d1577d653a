"""The local folder registry and the `lpeft publish | pull | versions | inspect` commands on it."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from hub_server import error_line, lpeft, make_adapter, pickle_only_adapter

from lightning_peft.errors import ConfigError
from lightning_peft.hub import LocalRegistry, list_versions, publish, pull
from lightning_peft.hub.manifest import MANIFEST_FILE


@pytest.fixture
def registry(tmp_path):
    return tmp_path / "registry"


def test_publish_versions_pull_round_trip(adapter, registry, tmp_path, tiny_model_dir):
    result = lpeft("publish", adapter, "acme/capitals", "--registry", registry, "-m", "first", "--license", "mit")
    assert result.exit_code == 0, result.output
    assert f"Published acme/capitals 1.0.0 (5 files) to {registry / 'acme/capitals/1.0.0'}" in result.stdout
    for args in (["--bump", "minor", "-m", "second"], ["--version", "2.0.0-rc.1"], ["--bump", "patch"]):
        assert lpeft("publish", adapter, "acme/capitals", "--registry", registry, "--no-verify", *args).exit_code == 0
    listing = lpeft("versions", "acme/capitals", "--registry", registry).stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["2.0.0-rc.1", "1.1.1", "1.1.0", "1.0.0"]
    assert listing[1].startswith("1.1.1  (latest)") and listing[2].endswith("second")
    index = json.loads((registry / "index.json").read_text())
    assert sorted(index["repos"]["acme/capitals"]) == ["1.0.0", "1.1.0", "1.1.1", "2.0.0-rc.1"]

    result = lpeft(
        "pull", "acme/capitals@~1.1", "--to", tmp_path / "pulled", "--registry", registry, "--base", tiny_model_dir
    )
    assert result.exit_code == 0, result.output
    assert "Pulled acme/capitals 1.1.1" in result.stdout and "base fingerprint matches" in result.stdout
    published = registry / "acme/capitals/1.1.1"
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == sorted(p.name for p in published.iterdir())
    for path in published.iterdir():
        assert (tmp_path / "pulled" / path.name).read_bytes() == path.read_bytes()
    manifest = json.loads((published / MANIFEST_FILE).read_text())
    assert manifest["parent_version"] == "1.1.0" and manifest["history"] == ["1.1.0", "1.0.0"]

    inspected = lpeft("inspect", tmp_path / "pulled", "--base", tiny_model_dir)
    assert inspected.exit_code == 0, inspected.output
    assert "package: acme/capitals 1.1.1" in inspected.stdout and "all match their sha256" in inspected.stdout
    assert "base: the fingerprint matches" in inspected.stdout


def test_the_index_is_as_readable_as_the_published_files(adapter, registry):
    old = os.umask(0o022)  # a team registry: what one member publishes, the others read
    try:
        assert lpeft("publish", adapter, "acme/shared", "--registry", registry, "--no-verify").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((registry / "index.json").stat().st_mode) == 0o644
    assert not [p.name for p in registry.iterdir() if p.name.startswith(".index")]


def test_pulled_package_loads_with_peft(adapter, registry, tmp_path, tiny_model_dir):
    publish(adapter, "acme/load", registry=registry, verify=False)
    pull("acme/load", tmp_path / "pulled", registry=registry)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 11, 40]])
    models = [
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder)).eval()
        for folder in (adapter, tmp_path / "pulled")
    ]
    with torch.no_grad():
        assert torch.equal(models[0](input_ids=ids).logits, models[1](input_ids=ids).logits)


def test_republishing_a_version_is_refused(adapter, registry):
    publish(adapter, "acme/x", registry=registry, verify=False)
    before = (registry / "acme/x/1.0.0" / MANIFEST_FILE).read_bytes()
    result = lpeft("publish", adapter, "acme/x", "--registry", registry, "--version", "1.0.0", "--no-verify")
    assert result.exit_code == 2
    assert "Version 1.0.0 is already published and published versions are immutable" in error_line(result)
    assert (registry / "acme/x/1.0.0" / MANIFEST_FILE).read_bytes() == before
    # The registry's own check, under its lock, for a version that appeared after the choice was made:
    staged = registry / ".staging" / "late"
    staged.mkdir(parents=True)
    version = list_versions("acme/x", registry=registry)[0].version
    with pytest.raises(ConfigError, match="already published in local registry"):
        LocalRegistry(registry).publish("acme/x", version, staged, message="", private=False)


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--version", "1.2"], "`--version`='1.2' is not a semantic version", 2),
        (["--private"], "`--private` applies to the Hugging Face Hub only", 2),
        (["--license", "Apache 2"], "is not a Hub license id", 2),
    ],
)
def test_bad_publish_options(adapter, registry, args, message, code):
    result = lpeft("publish", adapter, "acme/x", "--registry", registry, "--no-verify", *args)
    assert result.exit_code == code and message in error_line(result)
    assert not (registry / "acme").exists()


@pytest.mark.parametrize("repo_id", ["acme", "acme/bad name", "a/b/c", "acme/x--y", "acme/.hidden"])
def test_invalid_repo_id(adapter, registry, repo_id):
    result = lpeft("publish", adapter, repo_id, "--registry", registry, "--no-verify")
    assert result.exit_code == 2 and f"`REPO_ID`={repo_id!r}" in error_line(result)
    assert not registry.exists()


def test_not_an_adapter_folder(tmp_path, registry):
    (tmp_path / "empty").mkdir()
    result = lpeft("publish", tmp_path / "empty", "acme/x", "--registry", registry)
    assert result.exit_code == 2 and "is not a PEFT adapter folder: adapter_config.json is missing" in error_line(
        result
    )
    assert len(result.stderr.strip().splitlines()) == 1 and not registry.exists()


def test_pickle_only_weights_refused_unless_opted_in(adapter, registry, tmp_path):
    marker = tmp_path / "unpickled"
    folder = pickle_only_adapter(adapter, tmp_path / "bin", marker)
    result = lpeft("publish", folder, "acme/bin", "--registry", registry)
    assert result.exit_code == 2 and "only pickle weights (adapter_model.bin)" in error_line(result)
    assert not registry.exists()
    result = lpeft("publish", folder, "acme/bin", "--registry", registry, "--allow-pickle", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (registry / "acme/bin/1.0.0/adapter_model.bin").is_file() and not marker.exists()


def test_interrupted_publish_leaves_no_version(adapter, registry, monkeypatch):
    import lightning_peft.hub.package as package_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # after the weights were copied into the staging folder

    monkeypatch.setattr(package_module, "build_card", crash)
    with pytest.raises(KeyboardInterrupt):
        publish(adapter, "acme/x", registry=registry, verify=False)
    assert not (registry / "acme").exists() and list((registry / ".staging").iterdir()) == []
    # A staging folder left by a killed process is not a version either.
    (registry / ".staging" / "publish-killed").mkdir()
    (registry / ".staging" / "publish-killed" / "adapter_model.safetensors").write_bytes(b"half")
    assert list_versions("acme/x", registry=registry) == []


def _publish_version(args):
    adapter, registry, version = args
    return publish(adapter, "acme/concurrent", registry=registry, version=version, verify=False).version


def test_concurrent_publishes_of_different_versions(adapter, registry):
    versions = ["1.0.0", "1.1.0", "1.2.0", "2.0.0"]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        assert sorted(pool.map(_publish_version, [(adapter, registry, v) for v in versions])) == versions
    assert [str(i.version) for i in list_versions("acme/concurrent", registry=registry)] == versions
    index = json.loads((registry / "index.json").read_text())
    assert sorted(index["repos"]["acme/concurrent"]) == versions


def test_tampered_file_on_pull_lands_nothing(adapter, registry, tmp_path):
    publish(adapter, "acme/x", registry=registry, verify=False)
    weights = registry / "acme/x/1.0.0/adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = lpeft("pull", "acme/x@1.0.0", "--to", tmp_path / "pulled", "--registry", registry)
    assert result.exit_code == 3
    assert "file 'adapter_model.safetensors' fails its checksum" in error_line(result)
    assert not (tmp_path / "pulled").exists() and [p.name for p in tmp_path.iterdir()] == ["registry"]


@pytest.mark.parametrize("evil", ["../escaped.txt", "/tmp/absolute.txt"])
def test_manifest_paths_escaping_the_folder(adapter, registry, tmp_path, evil):
    publish(adapter, "acme/x", registry=registry, verify=False)
    manifest_path = registry / "acme/x/1.0.0" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"path": evil, "sha256": "0" * 64, "size": 1})
    manifest_path.chmod(0o644)
    manifest_path.write_text(json.dumps(manifest))
    result = lpeft("pull", "acme/x", "--to", tmp_path / "out" / "pulled", "--registry", registry)
    assert result.exit_code == 3 and f"file path {evil!r} escapes the package folder" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_pull_errors(adapter, registry, tmp_path, tiny_model_dir):
    result = lpeft("pull", "acme/none", "--to", tmp_path / "p", "--registry", registry)
    assert result.exit_code == 2 and "acme/none has no published version" in error_line(result)
    publish(adapter, "acme/x", registry=registry, verify=False)
    result = lpeft("pull", "acme/x@^2", "--to", tmp_path / "p", "--registry", registry)
    assert result.exit_code == 2 and "No published version satisfies '^2'; published: 1.0.0" in error_line(result)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = lpeft("pull", "acme/x", "--to", tmp_path / "full", "--registry", registry)
    assert result.exit_code == 2 and "exists and is not empty" in error_line(result)
    assert lpeft("pull", "acme/x", "--to", tmp_path / "full", "--registry", registry, "--overwrite").exit_code == 0
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / MANIFEST_FILE).is_file()


@pytest.mark.parametrize("reference", ["acme/none@^^1", "acme/x@1.x"])
def test_pull_rejects_a_malformed_range_before_any_lookup(registry, tmp_path, reference):
    # acme/none does not exist: the range is checked first, so its error is the one reported.
    result = lpeft("pull", reference, "--to", tmp_path / "p", "--registry", registry)
    spec = reference.partition("@")[2]
    assert result.exit_code == 2
    assert f"Version spec {spec!r} is malformed" in error_line(result)
    assert "^1.2, ~1.2, >=1,<2 or latest" in error_line(result)
    assert not (tmp_path / "p").exists()


def test_base_mismatch_refused_unless_forced(adapter, registry, tmp_path):
    from tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other-base", seed=1)
    publish(adapter, "acme/x", registry=registry, verify=False)
    result = lpeft("pull", "acme/x", "--to", tmp_path / "p", "--registry", registry, "--base", other)
    assert result.exit_code == 2 and "is not the one this adapter was trained on" in error_line(result)
    assert not (tmp_path / "p").exists()
    pull = ["pull", "acme/x", "--to", tmp_path / "p", "--registry", registry, "--base", other]
    result = lpeft(*pull, "--allow-base-mismatch")
    assert result.exit_code == 0 and "lpeft: warning: The base model" in result.stderr
    assert "deprecated" not in result.stderr
    result = lpeft("inspect", tmp_path / "p", "--base", other)
    assert result.exit_code == 2 and "pass --allow-base-mismatch" in error_line(result)
    result = lpeft("inspect", tmp_path / "p", "--base", other, "--allow-base-mismatch")
    assert result.exit_code == 0 and "base: MISMATCH (accepted with --allow-base-mismatch)" in result.stdout

    # The old spelling still works, hidden from --help, with one deprecation line naming the new flag.
    for command in ([*pull[:3], tmp_path / "q", *pull[4:]], ["inspect", tmp_path / "p", "--base", other]):
        result = lpeft(*command, "--force")
        assert result.exit_code == 0, result.output
        deprecations = [line for line in result.stderr.splitlines() if "deprecated" in line]
        assert deprecations == ["lpeft: warning: --force is deprecated; use --allow-base-mismatch."]
        help_text = lpeft(command[0], "--help").stdout
        assert "--allow-base-mismatch" in help_text and "--force" not in help_text


def test_inspect_reports_bad_files_and_serving_problems(tiny_model_dir, registry, tmp_path):
    dora = make_adapter(tmp_path / "dora", tiny_model_dir, use_dora=True, r=32)
    result = lpeft("publish", dora, "acme/dora", "--registry", registry, "--no-verify")
    assert result.exit_code == 0 and "lpeft: warning: Serving: DoRA (`use_dora`=true) is not supported" in result.stderr
    pull("acme/dora", tmp_path / "p", registry=registry)
    (tmp_path / "p" / "README.md").write_text("edited")
    (tmp_path / "p" / "extra.txt").write_text("?")
    result = lpeft("inspect", tmp_path / "p")
    assert result.exit_code == 3 and "file 'README.md' has 6 bytes" in error_line(result)
    assert "serving: DoRA" in result.stdout and "not in the manifest: extra.txt" in result.stdout
    plain = lpeft("inspect", dora)
    assert plain.exit_code == 0 and "a plain PEFT adapter, not a package" in plain.stdout


def test_dry_run_and_out(adapter, registry, tmp_path):
    result = lpeft(
        "publish", adapter, "acme/x", "--registry", registry, "--dry-run", "--out", tmp_path / "pkg", "--no-verify"
    )
    assert result.exit_code == 0 and "Dry run: acme/x 1.0.0" in result.stdout
    assert (tmp_path / "pkg" / MANIFEST_FILE).is_file()
    assert list_versions("acme/x", registry=registry) == []


def test_marketplace_commands_do_not_import_torch(adapter, registry, tmp_path, tiny_model_dir):
    code = textwrap.dedent(
        f"""
        import sys
        from lightning_peft.cli import main
        for args in (
            ["publish", {str(adapter)!r}, "acme/x", "--registry", {str(registry)!r}, "--no-verify"],
            ["versions", "acme/x", "--registry", {str(registry)!r}],
            ["pull", "acme/x@^1", "--to", {str(tmp_path / "p")!r}, "--registry", {str(registry)!r}, "--base", {str(tiny_model_dir)!r}],
            ["inspect", {str(tmp_path / "p")!r}, "--base", {str(tiny_model_dir)!r}],
        ):
            try:
                main(args)
            except SystemExit as exit:
                assert exit.code in (0, None), (args, exit.code)
        print("torch imported:", "torch" in sys.modules)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("torch imported: False")
