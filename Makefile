# The README's two commands: `make demo` and `make test`.
# Both create .venv, install the CPU build of torch first (override TORCH for a GPU build), then retrac.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_OUT ?= retrac-demo

.PHONY: setup demo test lint bench clean

$(BIN)/retrac: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/retrac

demo: setup
	$(BIN)/retrac demo --out $(DEMO_OUT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
