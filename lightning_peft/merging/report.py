"""The merge report: what was merged and measured (`merge_report.json`), the verdict, and its text."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.merging.job import Measured, MergeJob
from lightning_peft.merging.probes import Diff, MergeVerificationError, json_float

log = logging.getLogger(__name__)

REPORT_FILE = "merge_report.json"


@dataclass
class MergeReport:
    """What `merge_adapter` did and measured; written as `merge_report.json` beside the weights.

    `max_abs_logit_diff`/`mean_abs_logit_diff` compare the float32 merge with its `reference` (float64 forward
    passes) and are what `tolerance` gates; `saved_dtype_*` do the same for the weights rounded to `dtype`.
    `shift_from_trained` gives, per mode, how far the merged logits are from the model as trained.
    """

    mode: str
    dtype: str
    base: str
    base_path: str
    adapter: str
    peft_type: str
    quantization: str
    quantization_options: dict[str, Any] | None
    quantization_source: str
    reference: str
    trained_reference: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    saved_dtype_max_abs_logit_diff: float | None
    saved_dtype_mean_abs_logit_diff: float | None
    tolerance: float
    passed: bool
    probe_count: int
    probe_tokens: int
    shift_from_trained: dict[str, dict[str, float | None]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_report(
    job: MergeJob, mode: str, dtype: str, tolerance: float, measured: Measured, saved: Diff
) -> MergeReport:
    """The report of a merge with `mode`, saved in `dtype`; `saved` measures the weights rounded to `dtype`."""
    merge = measured.diff
    return MergeReport(
        mode=mode,
        dtype=dtype,
        base=job.base,
        base_path=job.base_path,
        adapter=str(job.adapter_dir),
        peft_type=job.peft_type,
        quantization=job.quantization,
        quantization_options=job.quantization_options,
        quantization_source=job.quantization_source,
        reference=reference_description(job.quantization, mode),
        trained_reference=reference_description(job.quantization, None),
        max_abs_logit_diff=merge.max,
        mean_abs_logit_diff=merge.mean,
        saved_dtype_max_abs_logit_diff=json_float(saved.max),
        saved_dtype_mean_abs_logit_diff=json_float(saved.mean),
        tolerance=tolerance,
        passed=merge.finite and saved.finite and merge.max <= tolerance,
        probe_count=len(measured.probes),
        probe_tokens=sum(p.shape[1] for p in measured.probes),
        shift_from_trained=measured.shifts,
        versions=versions(job.quantized),
        output=str(job.out),
    )


def reference_description(quantization: str, mode: str | None) -> str:
    """What the merge with `mode` is compared against (`mode` None: the model as trained)."""
    quantized = quantization != "none"
    trained = f"{quantization} base (float32 compute) + adapter, unmerged" if quantized else None
    if mode is None or not quantized:
        return trained or "base + adapter, unmerged"
    return {
        "dequantized": f"{quantization} base dequantized to float32 + adapter, unmerged",
        "original": "original full-precision base + adapter, unmerged",
        "quantized": trained,
    }[mode]


def versions(quantized: bool) -> dict[str, str]:
    """The installed versions of the libraries that computed the merge."""
    from importlib.metadata import PackageNotFoundError, version

    from lightning_peft import __version__

    found = {"lightning_peft": __version__}
    for package in ("torch", "transformers", "peft", "safetensors", *(("bitsandbytes",) if quantized else ())):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def raise_unless_passed(report: MergeReport, merge: Diff, saved: Diff, out: Path) -> None:
    """Raise `MergeVerificationError` saying why, and how to fix it, when the report did not pass."""
    if report.passed:
        return
    where = f"nothing was written to {out}"
    if not merge.finite:
        raise MergeVerificationError(
            f"The merged model (mode {report.mode!r}) gives NaN/Inf logits; {where}. Check the adapter weights."
        )
    if not saved.finite:
        raise MergeVerificationError(
            f"The merged weights overflow in {report.dtype} (NaN/Inf logits); {where}. "
            "Save with `dtype` float32 or bfloat16 (--dtype)."
        )
    if report.mode == "quantized" and report.quantization != "none":
        why = f"mode 'quantized' requantizes the merged weights to {report.quantization}"
        fix = "Use mode 'dequantized' (the default), or pass a larger `tolerance` (--tolerance) to accept the loss"
    else:
        why = f"mode {report.mode!r}"
        fix = (
            "Check that `base` and `quantization` are the ones the adapter was trained with, or pass a larger "
            "`tolerance` (--tolerance) if the difference is acceptable"
        )
    raise MergeVerificationError(
        f"The merged model differs from the adapter model: max abs logit diff {merge.max:.3g} > tolerance "
        f"{report.tolerance:.3g} ({why}); {where}. {fix}."
    )


def log_report(report: MergeReport) -> None:
    log.info(
        "Merged %s adapter (mode %s, %s) into %s: max abs logit diff %.3g (tolerance %.3g), mean %.3g; report in %s",
        report.peft_type,
        report.mode,
        report.dtype,
        report.output,
        report.max_abs_logit_diff,
        report.tolerance,
        report.mean_abs_logit_diff,
        REPORT_FILE,
    )
    if report.quantization != "none":
        for mode, shift in report.shift_from_trained.items():
            log.info(
                "  mode %-11s logits vs the %s-trained model: max abs diff %.3g, mean %.3g",
                mode,
                report.quantization,
                _or_nan(shift["max_abs_logit_diff"]),
                _or_nan(shift["mean_abs_logit_diff"]),
            )


def _or_nan(value: float | None) -> float:
    return value if value is not None else math.nan
