# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/ray-rec demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -rfEs

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m 'not slow'

lint: $(VENV)/.installed
	$(BIN)/ruff check ray_rec tests jobs bench
	$(BIN)/mypy ray_rec bench

bench: $(VENV)/.installed
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .pytest_cache
