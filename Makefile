# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install Bastion with what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench sim clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,postgres,redis]'
	touch $(STAMP)

demo: $(STAMP)  ## gateway + simulator on embedded defaults; prints a key and a curl
	$(BIN)/bastion demo

sim: $(STAMP)
	$(BIN)/bastion sim

test: $(STAMP)  ## the whole suite (lint, Python tests, JavaScript examples)
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(STAMP)  ## gateway benchmark (bench/README.md); options: make bench ARGS="--quick --scale"
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
