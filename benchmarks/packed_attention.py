"""Memory and time of packed rows as they grow: transformers' sdpa mask vs per-document attention.

    python benchmarks/packed_attention.py [--lengths 512,2048,8192] [--layers 4] [--steps 3] [--warmup 1]

A random-init Llama of SmolLM2-135M's layer shape (hidden 576, 9 heads, 3 key/value heads, MLP 1,536; `--layers`
of them, a 1,024-token vocabulary so the LM head stays out of the picture), fp32 on the CPU, trains on packed rows
from lightning-peft's own packer and collator (`loss_memory.packed_batch`: examples of log-normal lengths, median
a third of a row): 8 rows at 512 tokens, one row at longer lengths. For each length, one process runs training
steps (forward + backward) alternating between the two attention paths (`sdpa`: transformers' block-diagonal
(T x T) mask; `lpeft_packed`: `lightning_peft.packed_attention`), so both see the same machine load, and reports
per path: the best step time, the peak RSS of a step over the RSS before it (glibc's mmap threshold fixed at
64 KiB, so RSS follows the live tensors; see loss_memory.py), the bytes autograd saved for backward and how many
of them sit in (T x T)-shaped tensors. Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from loss_memory import _reset_peak, _status_kib, packed_batch

MB = 1 << 20
SMOLLM2_LAYER = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)


def build_model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **SMOLLM2_LAYER, num_hidden_layers=layers, vocab_size=1024, max_position_embeddings=16384, use_cache=False
    )
    return LlamaForCausalLM(config).train()


def step(model, batch: dict) -> dict:
    """One forward + backward; its time, its peak RSS over the RSS before it, and what it saved for backward."""
    import torch

    saved: dict[int, tuple[tuple[int, ...], int]] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        saved.setdefault(storage.data_ptr(), (tuple(tensor.shape), storage.nbytes()))
        return tensor

    _reset_peak()
    before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    logits.float().logsumexp(-1).mean().backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024 - before
    model.zero_grad(set_to_none=True)
    length = batch["input_ids"].shape[1]
    square = sum(n for shape, n in saved.values() if shape[-2:] == (length, length))
    return {"seconds": seconds, "peak": peak, "saved": sum(n for _, n in saved.values()), "square": square}


def measure(length: int, layers: int, steps: int, warmup: int = 1) -> list[dict]:
    from lightning_peft.packed_attention import register

    register()
    model = build_model(layers)
    rows = 8 if length <= 512 else 1
    batch = packed_batch(rows, length, model.config.vocab_size)
    runs: dict[str, list[dict]] = {"sdpa": [], "lpeft_packed": []}
    for i in range(2 * (warmup + steps)):  # the first pairs warm up
        backend = ("sdpa", "lpeft_packed")[i % 2]
        model.set_attn_implementation(backend)
        result = step(model, batch)
        if i >= 2 * warmup:
            runs[backend].append(result)
    documents = int((batch["position_ids"] == 0).sum())
    return [
        {
            "length": length,
            "rows": rows,
            "documents": documents,
            "attention": backend,
            "seconds": min(r["seconds"] for r in results),
            "peak": max(r["peak"] for r in results),
            "saved": results[-1]["saved"],
            "square": results[-1]["square"],
        }
        for backend, results in runs.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per path")
    parser.add_argument("--warmup", type=int, default=1, help="step pairs before those (first-call allocations)")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # glibc reads it at start-up only: run again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    import torch

    print(f"SmolLM2-shaped Llama, {args.layers} layers, fp32 CPU, {torch.get_num_threads()} threads")
    print("| tokens per row | rows (documents) | attention | step peak RSS over before | saved for backward "
          "| of it (T x T) | best step |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|")
    for length in (int(n) for n in args.lengths.split(",")):
        for r in measure(length, args.layers, args.steps, args.warmup):
            print(
                f"| {r['length']:,} | {r['rows']} ({r['documents']}) | {r['attention']} | {r['peak'] / MB:,.0f} MiB "
                f"| {r['saved'] / MB:,.0f} MiB | {r['square'] / MB:,.0f} MiB | {r['seconds']:.2f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
