"""The orchestrator: prepare once, train every system in its own process, aggregate, check, report.

    python -m benchmarks.harness --mode quick          # tiny random Llama, < 2 minutes (make bench-quick)
    python -m benchmarks.harness --mode full           # SmolLM2-135M-Instruct (make bench)
    python -m benchmarks.harness --mode gpu            # random-init 1B Llama in bf16 on one GPU (benchmarks/gpu.sh)
    python -m benchmarks.harness --mode quick --systems raw-lora-padded,lpeft-lora-padded --out /tmp/bench

1. Prepare: the model folder, the synthetic data (`data.py`), and the batch plan: the padded and packed batches
   lightning-peft's `SFTDataModule` yields for epoch 0, saved to a file that the raw loop and the Trainer systems
   read, so every system of a group trains on the same examples in the same batches.
2. Measure the matmul peak (fp32 on CPUs, bf16 on GPUs) and, on CPUs, the start-up time of `lpeft --help`.
3. Run: for each repeat, every system in turn, each in a fresh process with the same threads, seed and data.
4. Aggregate: medians over repeats of throughput (after the warm-up steps), peak RSS, time to first step; MFU
   from the FLOP count (`flops.py`); the per-step losses of each identical-batch group must agree, or the
   comparison is marked void. Then `report.py` writes `<out>/latest.json`, `<out>/latest.md` and `<out>/<mode>.*`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import report
from benchmarks.harness.systems import BY_NAME, SYSTEMS, System
from lightning_peft.allocator import allocator_environment

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
MODES: dict[str, dict[str, Any]] = {
    "quick": dict(
        shape="small", examples=96, max_length=128, batch_size=4, repeats=1, warmup=1, device="cpu", timeout=300
    ),
    "full": dict(
        shape="smollm2-135m-instruct",
        examples=32,
        max_length=256,
        batch_size=4,
        repeats=3,
        warmup=1,
        device="cpu",
        timeout=900,
    ),
    "gpu": dict(
        shape="1b",
        examples=768,
        max_length=1024,
        batch_size=8,
        repeats=1,
        warmup=3,
        device="cuda",
        timeout=240,
        budget=420,
    ),
}
LEARNING_RATE = 1e-3
SEED = 42
LORA_RANK = 16
# Per-step losses of identical batches may differ by float rounding only (different kernels and reduction orders).
LOSS_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--systems", help="comma-separated subset of: " + ", ".join(BY_NAME))
    parser.add_argument("--shape", help="smollm2-135m-instruct, or a random Llama: tiny, small, 1b")
    parser.add_argument("--examples", type=int, help="training examples (one epoch over them)")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--repeats", type=int, help="fresh runs of every system; medians are reported")
    parser.add_argument("--warmup", type=int, help="steps left out of the throughput window")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: 2 on cpu)")
    parser.add_argument("--timeout", type=int, help="seconds one system run may take")
    parser.add_argument(
        "--budget", type=int, help="seconds for the whole run; systems left when it is spent are skipped"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    parser.add_argument("--no-startup", action="store_true", help="skip the `lpeft --help` start-up measurement")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (model, data, logs)")
    args = parser.parse_args(argv)
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.budget = args.budget or 24 * 3600
    if args.warmup < 1:
        parser.error(f"--warmup {args.warmup}: at least 1 step (the first one pays for allocations and lazy init)")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.threads = args.threads or (2 if args.device == "cpu" else os.cpu_count())
    names = args.systems.split(",") if args.systems else [s.name for s in SYSTEMS if s.default]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    args.system_list = [BY_NAME[n] for n in names]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="lpeft-bench-"))
    os.environ.update(worker_env(args, workdir))
    started = time.time()
    try:
        setup = prepare(args, workdir)
        peak = measure_peak(args)
        startup = None if args.no_startup or args.device != "cpu" else measure_startup()
        runs = run_all(args, setup, workdir, deadline=started + args.budget)
        results = aggregate(args, setup, runs, peak, startup, time.time() - started)
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    paths = report.write(results, args.out, args.mode)
    print(report.markdown(results))
    print("written: " + ", ".join(str(p) for p in paths))
    return results


def worker_env(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """Environment of this process and every worker: same threads, offline, one data cache for all."""
    threads = str(args.threads)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(workdir / "datasets"),
        "LPEFT_DATA_CACHE": str(workdir / "data-cache"),
        "PYTHONPATH": pythonpath,
    }


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Model folder, data file and batch plan; lightning-peft's data cache is filled on the way."""
    import torch

    from benchmarks.harness import data, models
    from lightning_peft.models import load_tokenizer

    torch.set_num_threads(args.threads)
    model_dir = models.prepare_model(args.shape, workdir / "model", "cuda" if args.device == "cuda" else "cpu")
    tokenizer = load_tokenizer(str(model_dir))
    train_file = data.write_data(workdir / "train.jsonl", tokenizer, args.examples, args.max_length, seed=SEED)
    plan = data.build_plan(train_file, tokenizer, args.max_length, args.batch_size, SEED)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the random model was built on the GPU: leave its memory to the workers
    plan_file = workdir / "plan.pkl"
    with plan_file.open("wb") as handle:
        pickle.dump(plan, handle)
    config = json.loads((model_dir / "config.json").read_text())
    return {
        "model_dir": str(model_dir),
        "model_config": config,
        "train_file": str(train_file),
        "plan_file": str(plan_file),
        "data": data.describe(plan, args.max_length),
    }


def measure_peak(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.harness.flops import measure_peak as measure

    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    if args.device == "cuda":
        flops = measure("cuda", dtype, size=8192, trials=5, reps=20)
    else:
        flops = measure("cpu", dtype, size=2048, trials=8)
    return {"dtype": dtype, "flops": flops, "matmul": "8192x8192" if args.device == "cuda" else "2048x2048"}


def measure_startup() -> dict[str, Any] | None:
    script = REPO / "benchmarks" / "startup.py"
    done = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        print(f"startup measurement failed: {done.stderr.strip()[-500:]}")
        return None
    return json.loads(done.stdout)


def run_all(
    args: argparse.Namespace, setup: dict[str, Any], workdir: Path, deadline: float
) -> dict[str, list[dict[str, Any]]]:
    """Every system, `repeats` times, interleaved so a slow phase of the machine hits all of them alike.

    A run gets at most `args.timeout` seconds and never goes past `deadline`; once it has passed, the runs left
    are recorded as skipped.
    """
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in args.system_list}
    for repeat in range(args.repeats):
        for system in args.system_list:
            timeout = min(args.timeout, deadline - time.time())
            if timeout < 10:
                result = {"error": "skipped: the time budget (--budget) was spent", "skipped": True}
            else:
                result = run_one(args, setup, system, workdir / f"{system.name}-{repeat}", timeout)
            runs[system.name].append(result)
            print(progress_line(system, repeat, result), flush=True)
    return runs


def run_one(
    args: argparse.Namespace, setup: dict[str, Any], system: System, folder: Path, timeout: float
) -> dict[str, Any]:
    """One fresh worker process; its result, or {"error": ...} with the end of its log."""
    if system.runner == "trl_sft" and not _installed("trl"):
        return {"error": "TRL is not installed here (pip install 'lightning-peft[bench]')", "skipped": True}
    folder.mkdir(parents=True)
    spec = {
        "system": system.name,
        "runner": system.runner,
        "packing": system.packing,
        "quantization": system.quantization,
        "padding": system.padding,
        "model_options": dict(system.model_options),
        "trainer_options": dict(system.trainer_options),
        "model_class": system.model_class,
        "model_dir": setup["model_dir"],
        "train_file": setup["train_file"],
        "plan_file": setup["plan_file"],
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "lr": LEARNING_RATE,
        "seed": SEED,
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
        "warmup_steps": args.warmup,
        "workdir": str(folder),
        "out": str(folder / "result.json"),
    }
    spec_file = folder / "spec.json"
    log_file = folder / "log.txt"
    spec["t0"] = time.time()
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "benchmarks.harness.worker", str(spec_file)]
    with log_file.open("w") as log:
        try:
            env = {**os.environ, **dict(system.env)}
            if system.runner == "lpeft":  # as `lpeft fit` runs: on tcmalloc or tbbmalloc (lightning_peft.allocator)
                env = allocator_environment(env) or env
            done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            failed = done.returncode != 0
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s\n" + _tail(log_file)}
    if failed or not Path(spec["out"]).exists():
        return {"error": _tail(log_file)}
    return json.loads(Path(spec["out"]).read_text())


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return "\n".join(text[-lines:]) or "no output"


def progress_line(system: System, repeat: int, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"[{repeat}] {system.name}: FAILED: {result['error'].splitlines()[-1]}"
    rates = throughput(result)
    return (
        f"[{repeat}] {system.name}: {rates['active_tokens_per_s']:.1f} active tok/s, "
        f"{rates['processed_tokens_per_s']:.1f} processed tok/s, {result['steps']} steps, "
        f"first step at {result['time_to_first_step_s']:.1f} s, loss {result['losses'][-1]:.4f}"
    )


def throughput(result: dict[str, Any]) -> dict[str, float]:
    """Tokens per second over the steps after the warm-up."""
    warmup, per_step, seconds = result["warmup_steps"], result["per_step"], result["window_s"]
    return {f"{kind}_tokens_per_s": sum(per_step[kind][warmup:]) / seconds for kind in ("active", "real", "processed")}


def aggregate(
    args: argparse.Namespace,
    setup: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    peak: dict[str, Any],
    startup: dict[str, Any] | None,
    elapsed: float,
) -> dict[str, Any]:
    from benchmarks.harness.flops import training_flops

    flops = training_flops(setup["model_config"], LORA_RANK)
    # The machine's peak is the best matmul rate measured in this run (here before the runs, and in every worker
    # after its training): contention only ever lowers a measurement.
    measured = [peak["flops"], *(r["peak_flops"] for rs in runs.values() for r in rs if "peak_flops" in r)]
    peak = {**peak, "flops": max(measured), "lowest_flops": min(measured), "measurements": len(measured)}
    entries = [summarize(BY_NAME[name], results, flops, peak["flops"]) for name, results in runs.items()]
    checks = loss_checks(entries, runs, LOSS_TOLERANCE[args.precision])
    return {
        "mode": args.mode,
        "void": any(not c["agree"] for c in checks),
        "loss_checks": checks,
        "systems": entries,
        "settings": {
            "model": args.shape,
            "examples": args.examples,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "warmup_steps": args.warmup,
            "learning_rate": LEARNING_RATE,
            "lora": {"r": LORA_RANK, "alpha": 2 * LORA_RANK, "target_modules": "all-linear"},
            "precision": args.precision,
            "device": args.device,
            "threads": args.threads,
        },
        "data": setup["data"],
        "flops": {
            **flops,
            "peak_flops": peak["flops"],
            "peak_lowest_flops": peak["lowest_flops"],
            "peak_measurements": peak["measurements"],
            "peak_dtype": peak["dtype"],
            "peak_matmul": peak["matmul"],
        },
        "machine": machine(args),
        "startup": startup,
        "elapsed_s": round(elapsed, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def summarize(system: System, results: list[dict[str, Any]], flops: dict[str, int], peak: float) -> dict[str, Any]:
    """One system's entry: medians over its successful repeats, or its error."""
    from benchmarks.harness.flops import window_flops

    entry: dict[str, Any] = {"system": system.name, "label": system.label, "group": system.group}
    good = [r for r in results if "error" not in r]
    if not good:
        entry["error"] = results[0]["error"] if results else "not run"
        return entry
    rates = [throughput(r) for r in good]
    for key in rates[0]:
        entry[key] = statistics.median(r[key] for r in rates)
    entry["mfu"] = statistics.median(
        window_flops(flops, r["per_step"], r["warmup_steps"]) / r["window_s"] / peak for r in good
    )
    entry["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in good)
    if good[0]["peak_gpu_mb"] is not None:
        entry["peak_gpu_mb"] = statistics.median(r["peak_gpu_mb"] for r in good)
    entry["time_to_first_step_s"] = statistics.median(r["time_to_first_step_s"] for r in good)
    entry["final_loss"] = statistics.median(final_loss(r["losses"]) for r in good)
    entry["steps"] = good[0]["steps"]
    entry["repeats"] = len(good)
    entry["losses"] = good[0]["losses"]
    entry["per_repeat_active_tokens_per_s"] = [r["active_tokens_per_s"] for r in rates]
    return entry


def final_loss(losses: list[float]) -> float:
    """The mean training loss of the last quarter of the steps (one batch's loss alone is too noisy)."""
    tail = losses[-max(1, len(losses) // 4) :]
    return sum(tail) / len(tail)


def loss_checks(entries: list[dict[str, Any]], runs: dict[str, list[dict]], tolerance: float) -> list[dict[str, Any]]:
    """Within each identical-batch group, every system's per-step losses against the group's first system."""
    checks = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry["group"] and "error" not in entry:
            groups.setdefault(entry["group"], []).append(entry)
    for group, members in groups.items():
        reference = members[0]
        for other in members[1:]:
            a, b = reference["losses"], other["losses"]
            diff = max((abs(x - y) for x, y in zip(a, b, strict=False)), default=float("inf"))
            agree = len(a) == len(b) and diff <= tolerance
            checks.append(
                {
                    "group": group,
                    "reference": reference["system"],
                    "system": other["system"],
                    "steps": [len(a), len(b)],
                    "max_abs_loss_diff": diff,
                    "tolerance": tolerance,
                    "agree": agree,
                }
            )
    return checks


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    import torch

    from lightning_peft.cpu_precision import cpu_name

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": args.threads,
        "python": platform.python_version(),
        "versions": {},
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    for package in ("torch", "transformers", "peft", "lightning", "trl", "bitsandbytes", "lightning_peft"):
        try:
            from importlib.metadata import version

            info["versions"][package] = version(package.replace("_", "-"))
        except Exception:
            info["versions"][package] = None
    return info
