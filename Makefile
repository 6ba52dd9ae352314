# Two commands a newcomer needs: `make demo` and `make test`. Both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.damoc-installed
TORCH_CPU := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# Idempotent: the stamp is rebuilt only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@# An unpinned torch pulls several GB of CUDA packages: without a GPU take the CPU wheel first.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch; \
	else $(BIN)/python -m pip install -q $(TORCH_CPU); fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The zoo is built once (seconds to check afterwards), then the job runs end to end.
demo: setup
	$(BIN)/damoc zoo build --out zoo/demo --preset demo
	$(BIN)/damoc validate jobs/demo.yaml
	$(BIN)/damoc select jobs/demo.yaml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs zoo .pytest_cache
