"""Whole training steps side by side: fp32 vs bf16-mixed, eager vs `compile: true`, and their loss curves.

    python benchmarks/compile_precision.py [--model smollm2-135m-instruct] [--batch 8] [--length 512]
        [--documents 4] [--variants fp32,bf16,fp32-compile] [--steps 5] [--curve-steps 0]

Each variant is a `PeftCausalLM` (LoRA r16 all-linear, as `lpeft fit` builds it; bf16-mixed: bf16 base weights,
fp32 LoRA weights, bf16 autocast, as Lightning's `bf16-mixed` runs it on a CPU) with its own AdamW. A step is
what a training step costs: forward, loss, backward, optimizer step. The variants take their steps in turn in
this one process, so a shared machine's load falls on all of them alike; the first round (compiles, warm-up) is
reported apart. `--curve-steps N` then trains each variant N steps on the same batches (packed rows of random
tokens, a new batch every step) and prints the loss at each step and the largest difference to fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

VARIANTS = {
    "fp32": ("32-true", False),
    "bf16": ("bf16-mixed", False),
    "fp32-compile": ("32-true", True),
    "bf16-compile": ("bf16-mixed", True),
}


class _Trainer:
    """The one trainer attribute `PeftCausalLM.base_dtype` reads."""

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.max_steps = -1


def build(model: str, variant: str, rank: int) -> tuple[Any, torch.optim.Optimizer]:
    from lightning_peft import PeftCausalLM
    from lightning_peft.packed_attention import use_packed_attention

    precision, compiled = VARIANTS[variant]
    torch.manual_seed(0)
    module = PeftCausalLM(
        model, adapter={"r": rank, "lora_alpha": 2 * rank}, compile=compiled, save_adapter_on_fit_end=False
    )
    module._trainer = _Trainer(precision)
    module.configure_model()
    module._trainer = None
    use_packed_attention(module.model)
    params = [p for p in module.model.parameters() if p.requires_grad]
    return module, torch.optim.AdamW(params, lr=2e-4)


def packed_batch(vocab: int, rows: int, length: int, documents: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(length) % -(-length // documents)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions.expand(rows, length).clone()}


def train_step(module: Any, optimizer: torch.optim.Optimizer, batch: dict, bf16: bool) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        loss = module._shared_step(batch, module.train_loss, module.train_acc)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def timed(module: Any, optimizer: torch.optim.Optimizer, batch: dict, bf16: bool) -> float:
    start = time.perf_counter()
    train_step(module, optimizer, batch, bf16)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variants", default="fp32,bf16,fp32-compile")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds after the first")
    parser.add_argument("--curve-steps", type=int, default=0)
    args = parser.parse_args()
    names = args.variants.split(",")
    built = {name: build(args.model, name, args.rank) for name in names}
    vocab = next(iter(built.values()))[0].model.get_input_embeddings().num_embeddings
    batch = packed_batch(vocab, args.batch, args.length, args.documents, seed=0)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.steps + 1):
        for name, (module, optimizer) in built.items():
            seconds[name].append(timed(module, optimizer, batch, VARIANTS[name][0] != "32-true"))
    tokens = args.batch * args.length
    base = statistics.median(seconds[names[0]][1:])
    print(f"| variant | first step s | best s | median s | tokens/s (median) | speed vs {names[0]} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, times in seconds.items():
        median = statistics.median(times[1:])
        print(
            f"| {name} | {times[0]:.2f} | {min(times[1:]):.2f} | {median:.2f} | {tokens / median:.0f} "
            f"| {base / median:.3f}x |"
        )
    if args.curve_steps:
        curves(args, names, vocab)


def curves(args: argparse.Namespace, names: list[str], vocab: int) -> None:
    """Loss per step of each variant from the same start on the same batches; the largest gap to the first."""
    losses = {}
    for name in names:
        module, optimizer = build(args.model, name, args.rank)
        bf16 = VARIANTS[name][0] != "32-true"
        losses[name] = [
            train_step(module, optimizer, packed_batch(vocab, args.batch, args.length, args.documents, seed=s), bf16)
            for s in range(args.curve_steps)
        ]
    first = losses[names[0]]
    for name in names:
        gap = max(abs(a - b) for a, b in zip(losses[name], first, strict=True))
        print(f"{name}: losses {' '.join(f'{x:.4f}' for x in losses[name])}; largest gap to {names[0]} {gap:.4f}")


if __name__ == "__main__":
    main()
