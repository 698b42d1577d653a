"""Side-by-side training benchmark: lightning-peft against the loops and trainers users would pick instead.

`python -m benchmarks.harness --mode quick|full|gpu` (or `make bench-quick` / `make bench`, `benchmarks/gpu.sh`)
prepares one data set, one model and one fixed list of batches, then trains every system in its own fresh
process, one after the other, and writes `benchmarks/results/latest.json` and `latest.md`. See `run.py`.
"""
