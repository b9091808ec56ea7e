# lmforge developer entry points. Two commands do all set-up on a fresh machine:
#   make demo   - the whole lifecycle on the bundled sample with embedded defaults
#   make test   - the test suite
# Both create ./.venv on first use (CPU torch wheel pinned first so pip never pulls a CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install demo test test-fast bench clean help

help:
	@echo "make demo      run the full pipeline on the bundled sample (embedded defaults, no services)"
	@echo "make test      run the test suite (creates .venv on first use)"
	@echo "make test-fast run the tests not marked slow"
	@echo "make bench     run the CPU benchmarks side by side (see benchmarks/RESULTS.md)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,deepspeed]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lmforge run --config $(DEMO_CONFIG)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/train_step_throughput.py

clean:
	rm -rf .lmforge out .pytest_cache
