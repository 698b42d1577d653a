"""Merge a PEFT adapter into its base model and write a standard transformers folder — verified before writing.

No Lightning here: `lpeft merge` and the `AdapterMerge` callback both call `merge_adapter`.

Merge modes (they only differ when the base was quantized in training):

- `dequantized` (default): load the base quantized exactly as in training, dequantize each 4/8-bit weight to
  float32 and merge the adapter onto those — the weights the adapter was trained against.
- `original`: merge onto the original full-precision weights of the base checkpoint.
- `quantized`: PEFT's `merge_and_unload` on the quantized model, which requantizes every merged weight (lossy;
  it fails the default tolerance and is never the default).

Each merge is computed in float32 and checked on fixed probe inputs against the same weights and adapter,
unmerged (the `reference`; `tolerance` gates the difference). The check runs the forward passes in float64, so
that float32's own rounding (about 1e-4 on a 135M model's logits, merged or not) neither hides nor fakes a
difference. For a quantized base, how far each mode moves the logits from the model as trained (quantized
base + adapter) is reported too. Nothing is written unless the check passes: the folder is staged next to `out`
and renamed into place at the end.

The package: `options` (modes, dtypes, their check), `run_settings` (the quantization recorded in the run's
files), `job` (what to load; the merges), `probes` (the verification inputs and differences) and `report`
(`merge_report.json`, the verdict and its messages).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning_peft.atomic import staged_folder
from lightning_peft.merging.job import measure, plan_merge, round_to
from lightning_peft.merging.options import (
    DEFAULT_TOLERANCE,
    MERGE_DTYPES,
    MERGE_MODES,
    MergeDtype,
    MergeMode,
    check_merge_options,
)
from lightning_peft.merging.probes import MergeVerificationError
from lightning_peft.merging.report import REPORT_FILE, MergeReport, build_report, log_report, raise_unless_passed

__all__ = [
    "DEFAULT_TOLERANCE",
    "MERGE_DTYPES",
    "MERGE_MODES",
    "REPORT_FILE",
    "MergeDtype",
    "MergeMode",
    "MergeReport",
    "MergeVerificationError",
    "check_merge_options",
    "merge_adapter",
]


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    quantization: str | None = None,
    quantization_options: dict[str, Any] | None = None,
    mode: MergeMode = "dequantized",
    dtype: MergeDtype | None = None,
    tolerance: float | None = None,
    max_shard_size: str | int = "2GB",
    force: bool = False,
    compare_modes: bool | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Merge the adapter in `adapter_dir` into its base and write a transformers model folder to `out`.

    Args:
        adapter_dir: A plain PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        out: The folder to write (safetensors shards, config.json, generation_config.json, tokenizer files and
            merge_report.json). It must not exist (an empty folder is fine) unless `force`.
        base: The base model (alias, folder or Hub id); default: the adapter config's `base_model_name_or_path`.
        quantization: How the base was loaded in training: `none`, `4bit` or `8bit`. None reads it from the run's
            `hparams.yaml`/`config.yaml` next to the adapter (what `lpeft fit` leaves there), else `none`.
        quantization_options: The `BitsAndBytesConfig` arguments used in training (None: read like `quantization`).
        mode: `dequantized`, `original` or `quantized` (see the module docstring); all the same for a float base.
        dtype: Float dtype of the saved weights; default: the base checkpoint's own dtype (float32 if unknown).
        tolerance: Largest max-abs logit difference accepted between the merged and the unmerged model
            (default 1e-4).
        max_shard_size: Largest safetensors shard (`save_pretrained`'s `max_shard_size`).
        force: Replace an existing, non-empty `out`.
        compare_modes: Also merge with the other modes to report how each moves the logits. Default: when the
            base is quantized and under 2B parameters (each mode costs a float32 copy of the base).
        revision: Base model revision (Hub only).
        trust_remote_code: Allow the base model's own code (Hub only, for models you trust).

    Returns:
        The report that was written to `out/merge_report.json`.

    Raises:
        ConfigError: bad settings, an existing `out`, a method that cannot be merged (prompt learning).
        MergeVerificationError: the merged logits differ from the unmerged ones by more than `tolerance`, or are
            not finite; nothing is written then.
    """
    check_merge_options(mode, dtype, tolerance, quantization)
    job = plan_merge(adapter_dir, out, base, quantization, quantization_options, revision, trust_remote_code, force)
    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    dtype = dtype or job.default_dtype()
    tokenizer = job.load_tokenizer()
    measured = measure(job, tokenizer, mode, compare_modes)
    saved = (
        measured.diff if dtype == "float32" else round_to(measured.merged, dtype, measured.probes, measured.reference)
    )
    report = build_report(job, mode, dtype, tolerance, measured, saved)
    raise_unless_passed(report, measured.diff, saved, job.out)
    _write_folder(measured.merged, tokenizer, report, job.out, max_shard_size)
    log_report(report)
    return report


def _write_folder(model: Any, tokenizer: Any, report: MergeReport, out: Path, max_shard_size: str | int) -> None:
    """Stage the folder next to `out`, then rename it into place: `out` appears whole or not at all."""
    import torch

    model.to(getattr(torch, report.dtype))
    if hasattr(model.config, "quantization_config"):  # never the case for a float load; kept as a guarantee
        del model.config.quantization_config
    # `out` was checked (and --overwrite given if it exists) before the slow part started.
    with staged_folder(out, overwrite=True) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
