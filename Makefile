# mnist-job: `make train` and `make test` work from a fresh clone; `make help` lists all.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
# The benchmark's own venv: the CPU image's packages only (requirements/cpu.txt),
# so that the seed and the job are measured where the job runs, without the
# dev venv's extras (MLflow's scikit-learn and pandas slow Keras' start-up).
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
OUTPUT_DIR ?= outputs
ARGS ?=
WORKERS ?= 2
PYTEST_ARGS ?=
TENSORBOARD_HOST ?= localhost
TENSORBOARD_PORT ?= 6006
SWEEP_SPEC ?= docs/sweep-example.json
SWEEP_DIR ?= outputs-sweep
PARALLEL ?= 2

.PHONY: help install train train-multiworker sweep test test-fast lint format tensorboard bench bench-memory clean lock

help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort \
	  | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(VENV_STAMP): requirements/dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $@

install: $(VENV_STAMP) ## Create .venv with the pinned dependencies and the job

train: $(VENV_STAMP) ## Train with the seed's settings into outputs/ (ARGS="--epochs 1" etc.)
	$(VENV)/bin/mnist-job train --output-dir $(OUTPUT_DIR) $(ARGS)

train-multiworker: $(VENV_STAMP) ## Train with WORKERS local worker processes (default 2)
	$(PY) scripts/multiworker.py --workers $(WORKERS) -- --output-dir $(OUTPUT_DIR) $(ARGS)

sweep: $(VENV_STAMP) ## Run SWEEP_SPEC's trials into SWEEP_DIR (outputs-sweep/), PARALLEL (2) at once; print the report
	$(VENV)/bin/mnist-job sweep run $(SWEEP_SPEC) --output-dir $(SWEEP_DIR) --parallel $(PARALLEL)

test: $(VENV_STAMP) ## Run every test (slow ones included; docker ones skip without an engine)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV_STAMP) ## Run the fast tests only
	$(PY) -m pytest -m "not slow and not docker and not network" $(PYTEST_ARGS)

lint: $(VENV_STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV_STAMP) ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

tensorboard: $(VENV_STAMP) ## Serve OUTPUT_DIR's logs (a dir, gs:// or s3://) on TENSORBOARD_HOST:TENSORBOARD_PORT (localhost:6006)
	$(VENV)/bin/mnist-job tensorboard --logdir $(OUTPUT_DIR) --host $(TENSORBOARD_HOST) --port $(TENSORBOARD_PORT)

$(BENCH_STAMP): requirements/cpu.txt pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements/cpu.txt
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $@

bench: $(BENCH_STAMP) ## Benchmark the seed script against mnist-job, in the CPU image's packages (writes bench/)
	$(BENCH_VENV)/bin/python scripts/bench.py $(ARGS)

bench-memory: $(VENV_STAMP) ## Smallest container memory limit, job vs seed (docker, mnist-job:cpu; bench/memory.json)
	$(PY) scripts/memory_limit.py $(ARGS)

lock: ## Regenerate requirements/*.txt from pyproject.toml (needs pip-tools)
	scripts/lock.sh

clean: ## Remove the venvs, outputs and caches (not the MNIST cache)
	rm -rf $(VENV) $(BENCH_VENV) $(OUTPUT_DIR) $(SWEEP_DIR) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include docker/docker.mk
-include k8s/k8s.mk
