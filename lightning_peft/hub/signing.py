"""Signed packages: `lpeft publish --sign KEY`, `lpeft pull --trusted-key PUB`, the signer in `lpeft inspect`.

Signatures are made with the OpenSSF `model-signing` library (`pip install 'lightning-peft[sign]'`) using its
local elliptic-curve key pair signer: no network, no Sigstore transparency log. The signature is a Sigstore
bundle in `lpeft_signature.sig` beside the manifest; its DSSE payload is an in-toto statement holding the
sha256 of every file in the package folder, `lpeft_manifest.json` included (only the signature file itself is
left out). Verifying rehashes the whole folder, so a file changed, added or removed after signing fails, and the
key is checked against the bundle's key hint (the sha256 of the public key), which is also the signer fingerprint
that `lpeft inspect` shows.

Trusted keys are public key PEM files, from `--trusted-key` and from `$LPEFT_TRUSTED_KEYS` (paths separated
by `os.pathsep`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError, DataError, require

SIGNATURE_FILE = "lpeft_signature.sig"
TRUSTED_KEYS_ENV = "LPEFT_TRUSTED_KEYS"
_PURPOSE = "signed packages (`--sign`, `--trusted-key`); or `pip install 'lightning-peft[sign]'`"


def sign(package_dir: Path, private_key: str | os.PathLike) -> str:
    """Sign every file of `package_dir` with an elliptic-curve private key (PEM); return the signer fingerprint.

    Raises:
        ConfigError: the key cannot be read or is not an elliptic-curve private key.
    """
    require("model_signing", "model-signing", _PURPOSE)
    from model_signing import signing

    key = Path(private_key)
    if not key.is_file():
        raise ConfigError(f"`--sign` {key}: no such key file (an elliptic-curve private key, PEM).")
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=key)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"`--sign` {key} is not a usable elliptic-curve private key (PEM): {_first_line(err)}"
        ) from None
    config.set_hashing_config(_hashing()).sign(package_dir, package_dir / SIGNATURE_FILE)
    return signer(package_dir) or ""


def trusted_keys(keys: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The trusted public keys: those given, then those in `$LPEFT_TRUSTED_KEYS`; each must be a file."""
    from_env = [p for p in os.environ.get(TRUSTED_KEYS_ENV, "").split(os.pathsep) if p.strip()]
    found = [Path(k) for k in keys] + [Path(p.strip()) for p in from_env]
    for path in found:
        if not path.is_file():
            raise ConfigError(f"Trusted key {path} (from `--trusted-key` or `{TRUSTED_KEYS_ENV}`) is not a file.")
    return found


def verify(package_dir: Path, keys: list[Path], *, where: str) -> str:
    """Check that `package_dir` is signed by one of `keys` and that the signature covers exactly its bytes.

    Returns:
        The signer fingerprint.

    Raises:
        DataError: no signature, a signature by none of `keys`, or files that differ from what was signed.
    """
    require("model_signing", "model-signing", _PURPOSE)
    from model_signing import verifying

    if not (package_dir / SIGNATURE_FILE).is_file():
        raise DataError(f"{where} is not signed, and a trusted key was given: refused.")
    fingerprint = signer(package_dir)
    problems = []
    for key in keys:
        try:
            config = verifying.Config().use_elliptic_key_verifier(public_key=key)
            config.set_hashing_config(_hashing()).verify(package_dir, package_dir / SIGNATURE_FILE)
        except Exception as err:  # model-signing raises ValueError and its dependencies' own errors
            problems.append(_first_line(err))
            continue
        return fingerprint
    if any(p.startswith("Signature mismatch") for p in problems):
        text = " ".join(problems)  # model-signing's diff: a list of lines in one string, digests as bytes reprs
        changed = list(dict.fromkeys(re.findall(r"mismatch for \\*'([^'\\]+)", text)))
        changed += ["files added"] if "Extra files" in text else []
        changed += ["files removed"] if "Missing files" in text else []
        names = ", ".join(changed) or "see `lpeft inspect`"
        raise DataError(f"{where}: its files differ from what was signed ({names}); refused.")
    raise DataError(f"{where} is signed by key {fingerprint[:16]}…, which is none of the trusted keys; refused.")


def signer(package_dir: Path) -> str | None:
    """The fingerprint (sha256 of the public key) recorded in the folder's signature, or None if unsigned.

    This reads the bundle's key hint without checking the signature: `verify` is the check.
    """
    path = Path(package_dir) / SIGNATURE_FILE
    if not path.is_file():
        return None
    try:
        bundle = json.loads(path.read_bytes())
        return str(bundle["verificationMaterial"]["publicKey"]["hint"])
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not a model-signing signature bundle.") from None


def key_fingerprint(public_key: str | os.PathLike) -> str:
    """The fingerprint of a public key PEM, as `signer` reports it: model-signing's key hint, the sha256 of the
    key's canonical PEM (SubjectPublicKeyInfo)."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(Path(public_key).read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _hashing() -> Any:  # model_signing.hashing.Config, imported lazily
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["SIGNATURE_FILE", "TRUSTED_KEYS_ENV", "key_fingerprint", "sign", "signer", "trusted_keys", "verify"]
