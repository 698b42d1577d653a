"""Start-up cost of the `lpeft` command: `lpeft --help` against `python -c "import torch"`, and which commands
that neither train nor run a model import torch anyway.

    python benchmarks/startup.py [--runs 5] [--json]

Times are medians of fresh processes (wall clock from spawn to exit). The import check runs each command under
`python -X importtime` and looks for `torch` among the imported modules: the group's `--help` and `--version`,
`--help` of every subcommand except the LightningCLI ones (fit, validate, test, predict, whose help is built
from the model's and trainer's signatures), and a real `lpeft versions` on an empty local registry.
Target: `lpeft --help` in 0.5 s or less, and no torch import in any of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_S = 0.5
LIGHTNING_COMMANDS = {"fit", "validate", "test", "predict"}


def wall_time(command: list[str], runs: int) -> float:
    """Median seconds from spawn to exit over `runs` fresh processes."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lpeft_command() -> list[str]:
    """The installed `lpeft` console script, else `python -m lightning_peft`."""
    script = shutil.which("lpeft")
    return [script] if script else [sys.executable, "-m", "lightning_peft"]


def imported_modules(args: list[str]) -> set[str]:
    """Top-level names of the modules `lpeft ARGS` imports (from `python -X importtime`)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightning_peft", *args], capture_output=True, text=True, check=False
    )
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


def checked_commands(registry: str) -> list[list[str]]:
    """The command lines checked for a torch import."""
    from lightning_peft.cli import cli

    commands = [["--help"], ["--version"], ["versions", "acme/none", "--registry", registry]]
    commands += [[name, "--help"] for name in sorted(cli.commands) if name not in LIGHTNING_COMMANDS]
    return commands


def measure(runs: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as registry:
        torch_importers = [" ".join(args) for args in checked_commands(registry) if "torch" in imported_modules(args)]
    help_s = wall_time([*lpeft_command(), "--help"], runs)
    return {
        "lpeft_help_s": help_s,
        "import_torch_s": wall_time([sys.executable, "-c", "import torch"], runs),
        "runs": runs,
        "imports_torch": torch_importers,
        "target_s": TARGET_S,
        "met": help_s <= TARGET_S and not torch_importers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args.runs)
    if args.json:
        print(json.dumps(result))
        return
    print(f"lpeft --help            {result['lpeft_help_s']:.3f} s (median of {args.runs}; target ≤ {TARGET_S} s)")
    print(f'python -c "import torch" {result["import_torch_s"]:.3f} s')
    print("commands importing torch: " + (", ".join(result["imports_torch"]) or "none"))
    print("target met" if result["met"] else "target MISSED")


if __name__ == "__main__":
    main()
