# lmforge developer entry points. Two commands do all set-up on a fresh machine:
#   make demo   - the whole pipeline on the bundled sample with embedded defaults: the Kubeflow pipeline
#                 through kfp.local (re-runnable: unchanged tasks are reused; DEMO_ARGS=--overwrite
#                 starts afresh, DEMO_ARGS=--resume continues an interrupted pretraining)
#   make test   - the test suite
# Both create ./.venv on first use, installing torch first from PyTorch's CPU wheel index, so pip
# never pulls the multi-GB CUDA build. On a GPU machine pick the CUDA index instead, e.g.
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# (TORCH_INDEX_URL= uses only the default index). An unreachable index only costs pip a warning
# (and retries) when the wheel is found elsewhere (a local wheelhouse or a mirror in pip's config).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
DEMO_CONFIG ?= configs/demo.yaml
DEMO_ARGS ?=
PYTEST_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install demo demo-kfp test test-fast lint bench clean help

help:
	@echo "make demo      run the full pipeline on the bundled sample through kfp.local (embedded defaults,"
	@echo "               no services; under 12 min on 2 cores); again: unchanged tasks are reused"
	@echo "               (DEMO_ARGS=--overwrite or DEMO_ARGS=--resume)"
	@echo "make test      run the test suite (creates .venv on first use)"
	@echo "make test-fast run the tests not marked slow"
	@echo "make lint      ruff check, ruff format --check and mypy (model/ and the core layer), as CI runs them"
	@echo "make bench     run the CPU benchmarks side by side (see benchmarks/RESULTS.md)"
	@echo "make install   create .venv only (CPU torch; TORCH_INDEX_URL=... for a CUDA build)"
	@echo "make clean     delete what the demo and tests wrote here: .lmforge/ (demo outputs and the"
	@echo "               MLflow store), out/, .pytest_cache/, .mypy_cache/, build/; keeps .venv and ~/.cache/lmforge"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -e ".[dev,deepspeed]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lmforge run --config $(DEMO_CONFIG) $(DEMO_ARGS)

# Deprecated alias: `make demo` (`lmforge run`) is the Kubeflow pipeline through kfp.local
demo-kfp: demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Static checks, run by CI before the tests (.ci/run); each fails on any finding. mypy's targets
# (model/ and the core layer) and settings are in pyproject.toml's [tool.mypy].
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/train_step_throughput.py

clean:
	rm -rf .lmforge out .pytest_cache .mypy_cache build
