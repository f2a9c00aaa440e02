# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install Bastion with what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench sim clean fuzz fuzz-money soak

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

fuzz: $(STAMP)  ## property-based fuzzing of client input, 5,000 fresh examples per endpoint
	BASTION_FUZZ_EXAMPLES=$${BASTION_FUZZ_EXAMPLES:-5000} $(BIN)/pytest tests/test_fuzz_requests.py tests/test_fuzz_upstream.py -x -q

fuzz-money: $(STAMP)  ## randomized money test (tests/test_money_fuzz.py), 600 s on a random seed
	@seed=$${BASTION_FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "BASTION_FUZZ_SEED=$$seed"; \
	BASTION_FUZZ_SEED=$$seed BASTION_FUZZ_SECONDS=$${BASTION_FUZZ_SECONDS:-600} \
		$(BIN)/pytest tests/test_money_fuzz.py -x -q

bench: $(STAMP)  ## gateway benchmark (bench/README.md); options: make bench ARGS="--quick --scale"
	$(BIN)/python -m bench.run $(ARGS)

soak: $(STAMP)  ## 30-minute soak of one gateway (bench/soak.py); e.g. make soak ARGS="--minutes 5"
	$(BIN)/python -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
