"""One system, one fresh process: `python -m benchmarks.harness.worker SPEC.json` trains and writes its result.

A fresh process per run makes peak RSS and time to first step honest (nothing imported or loaded before) and
keeps the systems from warming each other's caches. The spec (written by `run.py`) names the system's module
(`raw`, `hf_trainer`, `trl_sft`, `lpeft`), the model, the data and the shared settings.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from benchmarks.harness.recorder import StepRecorder

    recorder = StepRecorder(spec["t0"], spec["warmup_steps"], cuda=spec["device"] == "cuda")
    runner = importlib.import_module(f"benchmarks.harness.{spec['runner']}")
    extra = runner.run(spec, recorder)
    result = {"system": spec["system"], **recorder.result(), "extra": extra, "peak_flops": peak(spec)}
    Path(spec["out"]).write_text(json.dumps(result))


def peak(spec: dict) -> float:
    """The matmul peak right after training, in this process: the run's best one is the machine's peak (a busy
    moment only lowers a measurement, so the best is the least disturbed)."""
    from benchmarks.harness.flops import measure_peak

    if spec["device"] == "cuda":
        return measure_peak("cuda", "bfloat16" if spec["precision"] == "bf16" else "float32", 8192, trials=3, reps=10)
    return measure_peak("cpu", "float32", 2048, trials=4)


if __name__ == "__main__":
    main(sys.argv[1])
