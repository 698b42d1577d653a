"""Tolerances derived from floating-point arithmetic, so that comparisons hold on every CPU.

Two computations of the same value that differ only in the order of their operations (another batch split,
chunking, number of processes, or the kernel a BLAS picks for another instruction set, shape or alignment) differ
by at most gamma_n * sum|terms| for each sum of n terms, gamma_n = n*u / (1 - n*u), u the unit roundoff of the
dtype (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., section 3.1). A value produced by k such
sums in a row carries at most k of these errors (to first order).

Tests bound sum|terms| by the largest magnitude in the compared tensor: where terms cancel, the sum of their
magnitudes exceeds that scale, and the worst case n*u used here exceeds the sqrt(n)*u that rounding errors reach
in practice by sqrt(n), which is the margin for it. The bounds are far below what a wrong computation gives
(a missing term, a wrong scale, a leak between examples: errors of the order of the values themselves).
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps / 2


def reordering_tolerance(n_terms: int, sums_in_a_row: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Bound, relative to the values' scale, on the difference two summation orders can make.

    Args:
        n_terms: the length of the longest sum whose order differs (reduction dimension, tokens, vocabulary ...).
        sums_in_a_row: how many such sums, one feeding the next, produce the compared value.
        dtype: the dtype the sums accumulate in.
    """
    gamma = n_terms * unit_roundoff(dtype)
    return sums_in_a_row * gamma / (1 - gamma)


def assert_close_reordered(
    got: torch.Tensor, want: torch.Tensor, n_terms: int, sums_in_a_row: int = 1, msg: str | None = None
) -> None:
    """`got` equals `want` up to `reordering_tolerance` times the largest magnitude in `want`."""
    scale = want.detach().abs().max().item()
    atol = reordering_tolerance(n_terms, sums_in_a_row, want.dtype) * scale
    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=msg)


# One forward pass of the tiny Llama (tests/tiny.py): its longest sums have 64 terms (the MLP's down projection),
# and each logit comes out of about 16 sums in a row (per layer: q/k/v, scores, softmax, values, o, gate/up,
# down; then the lm_head).
TINY_FORWARD = {"n_terms": 64, "sums_in_a_row": 16}
