"""Checks that need the base model: the fingerprint match, and the logits of a package against its source.

`check_base` only hashes files (no torch). `compare_logits` loads the base with transformers and both
adapters with PEFT, so torch is imported inside it and nowhere else in `hub/`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError
from lightning_peft.hub.fingerprint import fingerprint, locate_base
from lightning_peft.hub.manifest import MANIFEST_FILE, read

log = logging.getLogger(__name__)

LOGITS_TOLERANCE = 1e-5


def check_base(adapter_dir: str | Path, base: str, *, force: bool = False) -> bool:
    """Compare the base fingerprint a package records with the model `base` names.

    Call this before loading a pulled adapter onto a base. A folder without a manifest (a plain PEFT adapter)
    records no fingerprint and passes.

    Args:
        adapter_dir: A package folder (holding lpeft_manifest.json).
        base: An alias, a model folder or a cached Hub id.
        force: Only warn on a mismatch instead of raising.

    Returns:
        True when the fingerprints match (or nothing is recorded), False on a forced mismatch.

    Raises:
        ConfigError: the fingerprints differ and `force` is False.
        DataError: the manifest is malformed (a missing or wrong-typed field, the fingerprint included).
    """
    manifest_path = Path(adapter_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        return True
    recorded = read(Path(adapter_dir)).base_model  # a missing or malformed fingerprint fails here
    actual = fingerprint(locate_base(base).path)
    if actual == recorded.fingerprint:
        return True
    message = (
        f"The base model {base!r} (fingerprint {actual[:19]}…) is not the one this adapter was trained on "
        f"({recorded.id or 'a local model'}, fingerprint {recorded.fingerprint[:19]}…)"
    )
    if not force:
        raise ConfigError(f"{message}; load it onto that base, or pass --allow-base-mismatch to use it anyway.")
    warnings.warn(f"{message}; used anyway because of --allow-base-mismatch.", stacklevel=2)
    return False


def compare_logits(source_dir: Path, package_dir: Path, base_dir: Path) -> float:
    """Load the base once with both adapters and return the largest logit difference between them.

    Raises:
        ConfigError: the package does not load onto its base, or its logits differ from the source's.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT notes that the package names its base by Hub id, not this folder
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(source_dir), adapter_name="source")
            model.load_adapter(str(package_dir), adapter_name="package")
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        raise ConfigError(f"The adapter does not load onto its base {base_dir}: {err}") from err
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    model.eval()
    ids = _probe_ids(base.config)
    with torch.no_grad():
        logits = {}
        for name in ("source", "package"):
            model.set_adapter(name)
            logits[name] = model(input_ids=ids).logits.float()
    difference = (logits["source"] - logits["package"]).abs().max().item()
    if not difference <= LOGITS_TOLERANCE:
        raise ConfigError(
            f"The packaged adapter's logits differ from the source adapter's by {difference:.3g} "
            f"(tolerance {LOGITS_TOLERANCE}); the package is not published."
        )
    log.info("Verified: the package reproduces the source adapter's logits (max difference %.2g)", difference)
    return difference


def _probe_ids(config: Any) -> Any:
    """A fixed batch of token ids spread over the vocabulary."""
    import torch

    vocab = int(getattr(config, "vocab_size", 0) or 256)
    return (torch.arange(1, 17) * 7919 % vocab).unsqueeze(0)
