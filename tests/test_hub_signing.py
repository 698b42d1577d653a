"""Signed packages: `publish --sign`, `pull --trusted-key` (and $LPEFT_TRUSTED_KEYS), the signer in `inspect`.

Round trips on the local registry and on the fake Hub; every refusal leaves --to untouched.
"""

from __future__ import annotations

import pytest
from hub_server import error_line, lpeft

from lightning_peft.hub.signing import SIGNATURE_FILE, key_fingerprint

pytest.importorskip("model_signing")

REPO = "acme/signed"


def _key_pair(folder, name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {"alice": _key_pair(folder, "alice"), "mallory": _key_pair(folder, "mallory")}


@pytest.fixture(autouse=True)
def _no_keyring(monkeypatch):
    monkeypatch.delenv("LPEFT_TRUSTED_KEYS", raising=False)


def _publish(adapter, registry, *extra):
    result = lpeft("publish", adapter, REPO, "--registry", registry, "--no-verify", *extra)
    assert result.exit_code == 0, result.output
    return result


def _refused(result, target, message):
    assert result.exit_code == 3, result.output
    assert message in error_line(result) and len(error_line(result).splitlines()) == 1
    assert not target.exists()


@pytest.mark.parametrize("where", ["local", "hf"])
def test_sign_and_verify_round_trip(where, adapter, keys, tmp_path, request):
    registry = request.getfixturevalue("hub").url if where == "hf" else str(tmp_path / "registry")
    private, public = keys["alice"]
    published = _publish(adapter, registry, "--sign", private)
    assert f"Signed by key {key_fingerprint(public)}" in published.stdout

    result = lpeft(
        "pull", REPO, "--to", tmp_path / "pulled", "--registry", registry, "--trusted-key", keys["mallory"][1],
        "--trusted-key", public,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"signed by trusted key {key_fingerprint(public)}" in result.stdout
    assert (tmp_path / "pulled" / SIGNATURE_FILE).is_file()

    shown = lpeft("inspect", tmp_path / "pulled")
    assert shown.exit_code == 0, shown.output
    assert f"signer: key {key_fingerprint(public)}" in shown.stdout and "not in the manifest" not in shown.stdout


def test_keyring_from_the_environment(adapter, keys, tmp_path, monkeypatch):
    registry = str(tmp_path / "registry")
    _publish(adapter, registry, "--sign", keys["alice"][0])
    monkeypatch.setenv("LPEFT_TRUSTED_KEYS", f"{keys['mallory'][1]}:{keys['alice'][1]}")
    result = lpeft("pull", REPO, "--to", tmp_path / "pulled", "--registry", registry)
    assert result.exit_code == 0 and "signed by trusted key" in result.stdout, result.output


def test_wrong_key_is_refused(adapter, keys, tmp_path):
    registry = str(tmp_path / "registry")
    _publish(adapter, registry, "--sign", keys["mallory"][0])
    result = lpeft("pull", REPO, "--to", tmp_path / "pulled", "--registry", registry, "--trusted-key", keys["alice"][1])
    _refused(result, tmp_path / "pulled", "which is none of the trusted keys; refused")


def test_unsigned_package_is_refused_with_a_trusted_key_and_pulls_without(adapter, keys, tmp_path):
    registry = str(tmp_path / "registry")
    _publish(adapter, registry)
    result = lpeft("pull", REPO, "--to", tmp_path / "pulled", "--registry", registry, "--trusted-key", keys["alice"][1])
    _refused(result, tmp_path / "pulled", "acme/signed 1.0.0 is not signed, and a trusted key was given: refused.")
    result = lpeft("pull", REPO, "--to", tmp_path / "pulled", "--registry", registry)
    assert result.exit_code == 0 and "trusted key" not in result.stdout, result.output
    assert "signer: none (unsigned)" in lpeft("inspect", tmp_path / "pulled").stdout


def test_file_changed_after_signing_is_refused(hub, adapter, keys, tmp_path):
    _publish(adapter, "hf", "--sign", keys["alice"][0])
    # A new manifest (with matching checksums) over tampered weights: the checksums pass, the signature does not.
    import hashlib
    import json

    commit = hub.repos[REPO].commit(hub.repos[REPO].tags["v1.0.0"])
    config = commit.files["adapter_config.json"].replace(b'"r": 2', b'"r": 3')
    manifest = json.loads(commit.files["lpeft_manifest.json"])
    for entry in manifest["files"]:
        if entry["path"] == "adapter_config.json":
            entry["sha256"], entry["size"] = hashlib.sha256(config).hexdigest(), len(config)
    hub.tamper(REPO, "v1.0.0", "adapter_config.json", config)
    hub.tamper(REPO, "v1.0.0", "lpeft_manifest.json", json.dumps(manifest, indent=2).encode())
    result = lpeft("pull", REPO, "--to", tmp_path / "pulled", "--registry", "hf", "--trusted-key", keys["alice"][1])
    _refused(result, tmp_path / "pulled", "its files differ from what was signed (adapter_config.json, lpeft_manifest")


def test_bad_key_files_are_one_line_errors(adapter, keys, tmp_path):
    registry = str(tmp_path / "registry")
    result = lpeft("publish", adapter, REPO, "--registry", registry, "--no-verify", "--sign", keys["alice"][1])
    assert result.exit_code == 2 and "is not a usable elliptic-curve private key" in error_line(result), result.output
    result = lpeft("pull", REPO, "--to", tmp_path / "p", "--registry", registry, "--trusted-key", tmp_path / "none.pem")
    assert result.exit_code == 2 and "is not a file" in error_line(result), result.output
