"""The merge settings: modes, saved dtypes, the default tolerance, and their validation."""

from __future__ import annotations

from lightning_peft.errors import ConfigError
from lightning_peft.options import DTYPES as MERGE_DTYPES
from lightning_peft.options import MERGE_MODES, QUANTIZATIONS, MergeMode
from lightning_peft.options import DtypeName as MergeDtype

__all__ = ["DEFAULT_TOLERANCE", "MERGE_DTYPES", "MERGE_MODES", "MergeDtype", "MergeMode", "check_merge_options"]
DEFAULT_TOLERANCE = 1e-4


def check_merge_options(
    mode: str = "dequantized", dtype: str | None = None, tolerance: float | None = None, quantization: str | None = None
) -> None:
    """Validate merge settings, reporting every problem at once (used before any model is loaded)."""
    problems = []
    if mode not in MERGE_MODES:
        problems.append(f"`mode`={mode!r} is not one of {', '.join(MERGE_MODES)}")
    if dtype is not None and dtype not in MERGE_DTYPES:
        problems.append(f"`dtype`={dtype!r} is not one of {', '.join(MERGE_DTYPES)} (or leave it unset)")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        problems.append(f"`tolerance`={tolerance!r} must be a number >= 0")
    if quantization is not None and quantization not in QUANTIZATIONS:
        problems.append(f"`quantization`={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if problems:
        raise ConfigError("; ".join(problems) + ".")
