#!/usr/bin/env bash
# The side-by-side training benchmark on one GPU: every system of `make bench`, in bf16, on a random-init Llama
# of Llama-3.2-1B's shape (1.24B parameters; no weights can be downloaded there, and random weights cost the
# same to train), 768 synthetic examples of up to 1024 tokens, batch 8. It stops starting new systems after
# 7 minutes, so the whole script ends within 8. Results: benchmarks/results/gpu.{json,md} (and latest.*).
#
#   bash benchmarks/gpu.sh                  # on the GPU machine, after `make install-dev` and `pip install trl`
#   bash benchmarks/gpu.sh --systems raw-lora-packed,lpeft-lora-packed     # any harness option is passed on
#   bash benchmarks/gpu.sh --dry-run        # the same code path on the CPU with a tiny model (the tests run it)
#
# With --dry-run, results go to $BENCH_OUT (default: a new temporary folder), never to benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

args=(--mode gpu)
if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  args+=(--device cpu --precision fp32 --shape tiny --examples 24 --max-length 64 --batch-size 4 --warmup 1
         --threads 1 --systems raw-lora-padded,lpeft-lora-padded --no-startup --out "${BENCH_OUT:-$(mktemp -d)}")
else
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device here (use --dry-run to check the script on a CPU)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout --signal=INT 470 "$PYTHON" -m benchmarks.harness "${args[@]}" "$@"
