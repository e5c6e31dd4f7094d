# Two commands for a fresh machine with Python 3.10+:
#   make demo   installs into .venv, trains on the bundled digits (minutes on a CPU), samples
#   make test   installs into .venv (with test extras), lints (ruff) and runs the test suite
# TORCH is what pip installs for PyTorch (its arguments, so an index may be named): torch==2.13.0 by
# default, which is a small CPU build only where the package index serves one (on PyPI, Linux gets
# the CUDA build, several GB); `make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"`
# takes PyTorch's own CPU-only build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "ddpmkit needs Python 3.10+"'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH) || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ddpmkit train --out runs/demo --max-minutes 9.5
	$(BIN)/ddpmkit sample runs/demo --num 64 --sampler dpmpp-2m --steps 20 --size 32 --gif --out runs/demo/samples --fresh

test: install
	$(BIN)/python -m ruff check -q src tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs samples .pytest_cache
