"""A correction for bitsandbytes' 4-bit dequantization on CPUs with AVX-512.

bitsandbytes (0.50 at least) dequantizes NF4/FP4 weights on the CPU with a C++ kernel that takes an AVX-512 path
when the CPU has it. That path assumes every quantization block lies inside one row of the weight: when a row is
not a whole number of blocks (`in_features % blocksize != 0`, e.g. 32 or 96 inputs with the default 64-element
blocks) and there is more than one row, it reads the wrong scales and returns weights that are off by up to the
block's absmax. The scalar path (AVX2-only CPUs, or a single row) is right. Training, merging and serving then
compute with other base weights on an AVX-512 machine than on an AVX2 one.

Dequantization is elementwise over the flattened weight, so asking the kernel for one row of `N*K` values gives
the right answer on every path. `correct_cpu_dequantize_4bit` routes the affected shapes that way, and only on a
bitsandbytes whose kernel is found wrong by a probe: once bitsandbytes is fixed, nothing is changed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_library: Any = None  # the torch.library registration, kept alive for the process (dropping it undoes it)


def correct_cpu_dequantize_4bit() -> bool:
    """Make `bitsandbytes::dequantize_4bit` exact on this CPU; returns whether a correction was installed.

    Idempotent and cheap after the first call (a probe of one tiny tensor).
    """
    global _library
    if _library is not None:
        return True
    import torch

    if not _kernel_spans_rows_wrongly():
        return False
    # An AutogradCPU kernel runs before the CPU kernel bitsandbytes registered; below autograd it calls that one.
    library = torch.library.Library("bitsandbytes", "IMPL")
    library.impl("dequantize_4bit", _dequantize_4bit, "AutogradCPU")
    library.impl("dequantize_4bit.out", _dequantize_4bit_out, "AutogradCPU")
    _library = library
    log.info("bitsandbytes' CPU 4-bit dequantization is wrong for rows that split a block here: corrected")
    return True


def _row_spans_blocks(shape: Sequence[int], blocksize: int) -> bool:
    return len(shape) >= 2 and math.prod(shape[:-1]) > 1 and shape[-1] % blocksize != 0


def _dequantize_4bit(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype):
    import torch

    with torch._C._AutoDispatchBelowAutograd():
        if not _row_spans_blocks(shape, blocksize):
            return torch.ops.bitsandbytes.dequantize_4bit.default(A, absmax, blocksize, quant_type, shape, dtype)
        flat = torch.ops.bitsandbytes.dequantize_4bit.default(
            A, absmax, blocksize, quant_type, [1, math.prod(shape)], dtype
        )
        return flat.reshape(shape)


def _dequantize_4bit_out(A, absmax, blocksize: int, quant_type: str, shape: Sequence[int], dtype, out) -> None:
    out.copy_(_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))


def _kernel_spans_rows_wrongly() -> bool:
    """Dequantize a (4, 32) NF4 weight, two 64-element blocks of different scales, as 4 rows and as 1 row.

    The wrong kernel gives rows 2-3 the first block's scale.
    """
    import bitsandbytes.functional as F
    import torch

    ramp = torch.linspace(-1.0, 1.0, 64)
    weight = torch.cat([ramp, 2 * ramp]).reshape(4, 32)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    as_rows = torch.ops.bitsandbytes.dequantize_4bit.default(packed, state.absmax, 64, "nf4", [4, 32], torch.float32)
    as_one_row = torch.ops.bitsandbytes.dequantize_4bit.default(
        packed, state.absmax, 64, "nf4", [1, 128], torch.float32
    )
    return not torch.equal(as_rows.reshape(1, 128), as_one_row)
