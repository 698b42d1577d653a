"""4-bit dequantization on the CPU is exact on every instruction set (`lightning_peft.bnb_cpu`)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from lightning_peft.bnb_cpu import correct_cpu_dequantize_4bit  # noqa: E402
from lightning_peft.models import load_base_model  # noqa: E402


def by_hand(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantize from the definition: code[nibble] * its block's absmax, high nibble first, over the flat weight."""
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    data = packed.view(torch.uint8).flatten()
    nibbles = torch.stack([data >> 4, data & 0xF], dim=1).flatten().long()
    n = torch.Size(state.shape).numel()
    values = state.code[nibbles[:n]]
    scales = absmax.repeat_interleave(state.blocksize)[:n]
    return (values * scales).reshape(state.shape)


# Rows of 16/32/48/96/160 inputs split 64- or 128-element blocks across rows (the AVX-512 kernel's failure);
# 64 and 576 (SmolLM2's width) are whole blocks; one row never splits.
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize(
    "shape", [(16, 16), (3, 32), (16, 32), (16, 48), (3, 96), (16, 160), (3, 64), (4, 576), (1, 96)]
)
@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", False), ("nf4", True), ("fp4", False)])
def test_4bit_dequantization_equals_the_definition(shape, blocksize, quant_type, nested):
    correct_cpu_dequantize_4bit()
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    want = by_hand(packed, state)
    # One fp32 product per value on every path: bitwise equal.
    torch.testing.assert_close(F.dequantize_4bit(packed, state), want, rtol=0, atol=0)
    # And it is a quantization of the weight: within half the widest gap of the code, times the block's absmax.
    widest_gap = state.code.sort().values.diff().max()
    assert ((want - weight).abs() <= widest_gap / 2 * weight.abs().max() + 1e-6).all()


def test_a_4bit_model_narrower_than_a_block_computes_with_its_dequantized_weights(tiny_model_dir):
    # The tiny Llama has 32 inputs per projection: every one of its 4-bit layers splits blocks across rows.
    model = load_base_model(str(tiny_model_dir), quantization="4bit")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.in_features % layer.weight.quant_state.blocksize != 0
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weight = by_hand(layer.weight.data, layer.weight.quant_state)
    y = layer(x)
    # The same fp32 linear on the same weights (bitsandbytes dequantizes, then calls F.linear): bitwise equal.
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    # Sums of `out_features` terms in another order: |error| <= n * u * sum|terms| (Higham's gamma_n).
    bound = layer.out_features * torch.finfo(torch.float32).eps / 2 * weight.abs().sum(0)
    assert ((grad - weight.sum(0)).abs() <= bound).all()
