"""`python -m benchmarks.harness ...`: see `run.py`."""

from benchmarks.harness.run import main

if __name__ == "__main__":
    main()
