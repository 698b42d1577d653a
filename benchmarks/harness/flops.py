"""Model FLOPs of LoRA training, and the matmul peak of this machine, for the model FLOPs utilization (MFU).

The work a step needs, matmuls only (norms, activations, softmax and the optimizer are left out, as in the
usual MFU accounting), counted from the batch's examples, never from its padding:

- per real token, a frozen linear layer (in x out) costs its forward and the gradient of its input:
  2 + 2 = 4 * in * out; a trainable one (the LoRA A and B matrices) also its weight gradient: 6 * r * (in + out)
  per adapted layer; except the first layer's q, k and v projections, which need no input gradient (nothing
  before them trains), so that part is not counted for them (their base weights and LoRA A);
- per supervised token (a target of the loss), the frozen LM head: 4 * hidden * vocab. Logits of the other
  positions are not needed: a loop that computes them does more work than the step needs, and a loss that
  recomputes them in the backward (chunked, checkpointed) does too; neither extra is counted;
- per causal (query, key) pair of an example (key <= query) and per layer, attention costs
  4 * heads * head_dim in the forward (scores and the weighted sum) and twice that in the backward; the pairs of
  each example are counted on their own, so padding and the masked-out blocks of packed rows are not counted.

torch's FLOP counter agrees exactly with the linear and LM-head part, and with the per-pair cost (tested). MFU =
counted FLOPs / time / the machine's matmul peak: the best of the `measure_peak` measurements of the same run
(before the runs, and in every worker right after its training).
"""

from __future__ import annotations

import time
from typing import Any


def linear_shapes(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(in, out) of every linear layer in the decoder layers of a Llama-like config (LM head excluded)."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = [
        (hidden, heads * head_dim),  # q
        (hidden, kv_heads * head_dim),  # k
        (hidden, kv_heads * head_dim),  # v
        (heads * head_dim, hidden),  # o
        (hidden, ffn),  # gate
        (hidden, ffn),  # up
        (ffn, hidden),  # down
    ]
    return per_layer * config["num_hidden_layers"]


def training_flops(config: dict[str, Any], lora_rank: int) -> dict[str, int]:
    """FLOPs "per_token" (real token), "per_target" (supervised token) and "per_attention_pair" (causal pair)."""
    linears = linear_shapes(config)
    frozen = sum(4 * n_in * n_out for n_in, n_out in linears)
    lora = sum(6 * lora_rank * (n_in + n_out) for n_in, n_out in linears)
    first_qkv = linears[:3]  # their input is the frozen embedding's output: no gradient flows into it
    no_input_grad = sum(2 * n_in * n_out + 2 * lora_rank * n_in for n_in, n_out in first_qkv)
    lm_head = 4 * config["hidden_size"] * config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {
        "per_token": frozen + lora - no_input_grad,
        "per_target": lm_head,
        "per_attention_pair": 3 * 4 * heads * head_dim * config["num_hidden_layers"],
    }


def window_flops(flops: dict[str, int], per_step: dict[str, list[int]], warmup: int) -> int:
    """FLOPs of the steps after the warm-up, from each step's real and supervised tokens and attention pairs."""
    tokens = sum(per_step["real"][warmup:])
    targets = sum(per_step["active"][warmup:])
    pairs = sum(per_step["attention_pairs"][warmup:])
    return tokens * flops["per_token"] + targets * flops["per_target"] + pairs * flops["per_attention_pair"]


def measure_peak(
    device: str = "cpu", dtype_name: str = "float32", size: int = 2048, trials: int = 8, reps: int = 1
) -> float:
    """The best matmul rate over `trials` timings of `reps` square (size x size) products, in FLOP/s, with the
    current torch threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = 0.0
    for trial in range(trials + 1):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        if trial:  # the first timing warms up the kernels
            best = max(best, reps * 2 * size**3 / (time.perf_counter() - start))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
