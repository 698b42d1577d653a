"""Data sets of millions of rows: how long until the first training batch, and how much memory and disk it takes.

    python benchmarks/data_scale.py [--rows 1000000] [--num-proc N] [--skip-datasets] [--json PATH]

Generates ROWS synthetic multi-turn conversations (JSON Lines, about 300 tokens each with SmolLM2's tokenizer and
chat template) in a temporary folder, then measures each preparation in a fresh process, cold cache then warm:

- lightning-peft: `SFTDataModule(train_file=..., tokenizer=SmolLM2)`, `setup("fit")` and the first training batch;
  then the same with `packing=True` twice on the warm cache (the first start plans the rows, the second reads
  the plan back).
- datasets.map, as TRL's SFTTrainer prepares conversations: `load_dataset("json")`, then a `map` that calls
  `apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)` per row (TRL's
  `assistant_only_loss`), with `num_proc` processes, then the first batch of 4 rows padded.

Figures: seconds from process start to the first batch (imports included); tokens per second of the cold
preparation, per wall-clock second and per CPU second (other load on the machine lengthens wall times, hardly CPU
times); the peak memory of the process and its workers together (proportional set size, so pages that forked
workers share count once; sampled every 0.1 s with psutil); and the cache size on disk against the bytes of the
tokens it holds (2 bytes per token: SmolLM2's vocabulary fits uint16). The table is printed; the figures go to
benchmarks/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOKENIZER = "smollm2-135m-instruct"
WARM_TARGET_S = 10.0
RESULTS = Path(__file__).parent / "results" / "data_scale.json"
_WORDS = [
    "the",
    "model",
    "data",
    "train",
    "learn",
    "token",
    "batch",
    "memory",
    "value",
    "answer",
    "question",
    "river",
    "mountain",
    "city",
    "people",
    "system",
    "number",
    "small",
    "large",
    "quickly",
    "because",
    "between",
    "always",
    "history",
    "science",
    "music",
    "garden",
    "window",
    "morning",
    "evening",
    "computer",
    "language",
    "between",
    "reason",
    "simple",
    "complex",
    "result",
    "example",
    "different",
    "important",
    "general",
    "special",
    "problem",
    "method",
    "process",
    "figure",
    "energy",
    "market",
    "report",
    "policy",
    "change",
    "growth",
    "health",
    "family",
    "season",
    "travel",
]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """ROWS conversations of 2 or 3 user/assistant exchanges (a system turn in one of three), ~300 tokens each."""
    rng = random.Random(seed)
    pool = [" ".join(rng.choices(_WORDS, k=rng.randint(6, 16))).capitalize() + "." for _ in range(20000)]
    with path.open("w") as out:
        for _ in range(rows):
            messages = [{"role": "system", "content": rng.choice(pool)}] if rng.random() < 1 / 3 else []
            for _ in range(rng.randint(2, 3)):
                messages.append({"role": "user", "content": " ".join(rng.choices(pool, k=rng.randint(2, 4)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(pool, k=rng.randint(4, 8)))})
            out.write(json.dumps({"messages": messages}) + "\n")


def child_lpeft(file: str, num_proc: int | None, start: float, packing: bool = False) -> dict:
    from lightning_peft.data import SFTDataModule
    from lightning_peft.models import load_tokenizer

    kwargs = {} if num_proc is None else {"num_proc": num_proc}
    dm = SFTDataModule(train_file=file, tokenizer=load_tokenizer(TOKENIZER), max_length=1024, packing=packing, **kwargs)
    dm.setup("fit")
    prepared = time.time() - start
    next(iter(dm.train_dataloader()))
    stats = dm.stats["train"]
    return {"prepared_s": prepared, "first_batch_s": time.time() - start, "tokens": stats["tokens"],
            "examples": stats["examples"], "from_cache": dm.train_dataset.data.from_cache,
            "rows": len(dm.train_dataset)}  # fmt: skip


def child_datasets(file: str, num_proc: int | None, start: float) -> dict:
    import pyarrow.compute as pc
    from datasets import load_dataset

    from lightning_peft.models import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)

    def tokenize(example):  # TRL's SFTTrainer._prepare_dataset for conversational data with assistant_only_loss
        out = tokenizer.apply_chat_template(example["messages"], return_dict=True, return_assistant_tokens_mask=True)
        return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}

    dataset = load_dataset("json", data_files=file, split="train")
    dataset = dataset.map(tokenize, remove_columns=["messages"], num_proc=num_proc or len(os.sched_getaffinity(0)))
    prepared = time.time() - start
    batch = tokenizer.pad({"input_ids": dataset[:4]["input_ids"]}, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 4
    tokens = int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py())
    return {"prepared_s": prepared, "first_batch_s": time.time() - start, "tokens": tokens, "examples": len(dataset)}


def run_child(kind: str, file: Path, cache: Path, num_proc: int | None) -> dict:
    """One preparation in a fresh process; its figures, the peak memory of the process tree (PSS: pages shared by
    forked workers count once) and the CPU seconds it used (robust to other load on the machine, unlike wall time)."""
    import resource

    import psutil

    env = {**os.environ, "LPEFT_DATA_CACHE": str(cache / "lpeft"), "HF_DATASETS_CACHE": str(cache / "datasets")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    command = [sys.executable, __file__, "--child", kind, "--file", str(file), "--start", str(time.time())]
    if num_proc is not None:
        command += ["--num-proc", str(num_proc)]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(_memory(p) for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{kind} preparation failed (exit {process.returncode})")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {**json.loads(out.strip().splitlines()[-1]), "peak_memory_mb": peak / 2**20, "cpu_s": cpu}


def _memory(process) -> int:
    """Proportional set size where the OS reports it (Linux), else resident set size."""
    info = process.memory_full_info()
    return getattr(info, "pss", info.rss)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def measure(rows: int, num_proc: int | None, kinds: list[str], workdir: Path) -> dict:
    file = workdir / "conversations.jsonl"
    began = time.time()
    generate(file, rows)
    results = {"rows": rows, "file_mb": file.stat().st_size / 2**20, "generate_s": time.time() - began}
    results["num_proc"] = num_proc or len(os.sched_getaffinity(0))
    for kind in kinds:
        cache = workdir / f"cache-{kind}"
        cold = run_child(kind, file, cache, num_proc)
        warm = run_child(kind, file, cache, num_proc)
        size = folder_bytes(cache)
        if kind == "lpeft":  # packing: the first start plans the rows, the next reads the plan from the cache
            results["lpeft-packed"] = {
                "first": run_child("lpeft-packed", file, cache, num_proc),
                "warm": run_child("lpeft-packed", file, cache, num_proc),
            }
        results[kind] = {
            "cold": cold,
            "warm": warm,
            "tokens_per_s": cold["tokens"] / cold["prepared_s"],
            "tokens_per_cpu_s": cold["tokens"] / cold["cpu_s"],
            "cache_mb": size / 2**20,
            "cache_over_token_bytes": size / (2 * cold["tokens"]),
        }
    return results


def table(results: dict) -> str:
    head = (
        f"{results['rows']:,} conversations ({results['file_mb']:.0f} MB of JSON Lines), num_proc={results['num_proc']}"
    )
    lines = [head, "", "| | cold: first batch (s) | warm: first batch (s) | tokens/s (cold) | tokens per CPU-s (cold) |"
             " peak memory cold (MB) | peak memory warm (MB) | cache (MB) | cache / token bytes |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in ("lpeft", "datasets"):
        if kind in results:
            r = results[kind]
            lines.append(
                f"| {'lightning-peft' if kind == 'lpeft' else 'datasets.map (TRL)'} | {r['cold']['first_batch_s']:.1f} "
                f"| {r['warm']['first_batch_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} "
                f"| {r['cold']['peak_memory_mb']:,.0f} | {r['warm']['peak_memory_mb']:,.0f} | {r['cache_mb']:,.0f} "
                f"| {r['cache_over_token_bytes']:.2f} |"
            )
    if "lpeft-packed" in results:
        first, warm = results["lpeft-packed"]["first"], results["lpeft-packed"]["warm"]
        lines += ["", f"lightning-peft with packing (rows of up to 1024 tokens, {warm['rows']:,} rows): first batch "
                  f"{first['first_batch_s']:.1f} s on the first packed start (tokens cached, rows planned), "
                  f"{warm['first_batch_s']:.1f} s warm (plan cached); {warm['cpu_s']:.1f} CPU s, "
                  f"peak memory {warm['peak_memory_mb']:,.0f} MB."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=None, help="preparation processes (default: every core)")
    parser.add_argument("--skip-datasets", action="store_true", help="measure lightning-peft only")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data and caches here")
    parser.add_argument("--child", choices=["lpeft", "lpeft-packed", "datasets"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "datasets":
            print(json.dumps(child_datasets(args.file, args.num_proc, args.start)))
        else:
            print(json.dumps(child_lpeft(args.file, args.num_proc, args.start, packing=args.child == "lpeft-packed")))
        return
    kinds = ["lpeft"] if args.skip_datasets else ["lpeft", "datasets"]
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        results = measure(args.rows, args.num_proc, kinds, Path(workdir))
    results["warm_target_s"] = WARM_TARGET_S
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
