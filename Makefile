# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv; each installs only what it needs (stamp files below).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamps: Bastion and its dependencies (the demo); + the test tools (pytest, openai,
# ruff, ...); + the Python clients of examples/ (LangChain, litellm, the Agents SDK)
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
EXAMPLES := $(VENV)/.installed-examples
NODE_EXAMPLES := examples/node/node_modules/.package-lock.json
# Outside tools the tests drive: Debian's Chromium (the console's browser test) and
# promtool (checks deploy/prometheus/alerts.yml), taken from Debian's `prometheus`
# package without installing or starting the Prometheus service
TOOLS := $(VENV)/.installed-tools
APT := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)

.PHONY: demo test examples bench bench-routing sim clean fuzz fuzz-money soak

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,postgres,redis]'
	touch $@

$(EXAMPLES): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,examples]'
	touch $@

$(TOOLS): | $(BIN)/python
	@command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive $(APT) install -y -q chromium
	@[ -x $(BIN)/promtool ] || { d=$$(mktemp -d) && chmod 755 $$d && cd $$d && $(APT) download -q prometheus \
		&& dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool $(CURDIR)/$(BIN)/ \
		&& rm -rf $$d; }
	touch $@

$(NODE_EXAMPLES): examples/node/package-lock.json
	cd examples/node && npm ci --no-audit --no-fund

demo: $(RUNTIME)  ## gateway + simulator on embedded defaults; prints a key, a curl, a CLI command
	$(BIN)/bastion demo

sim: $(RUNTIME)
	$(BIN)/bastion sim

test: $(STAMP) $(TOOLS)  ## the whole suite (lint, Python tests, JavaScript examples)
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2  # two workers: the outage and partition tests mostly wait

examples: $(EXAMPLES) $(NODE_EXAMPLES)  ## all six client examples (examples/) against a test gateway
	BASTION_ALL_EXAMPLES=1 $(BIN)/pytest tests/test_client_examples.py

fuzz: $(STAMP)  ## property-based fuzzing of client input, 5,000 fresh examples per endpoint
	BASTION_FUZZ_EXAMPLES=$${BASTION_FUZZ_EXAMPLES:-5000} $(BIN)/pytest tests/test_fuzz_requests.py tests/test_fuzz_upstream.py -x -q

fuzz-money: $(STAMP)  ## randomized money test (tests/test_money_fuzz.py), 600 s on a random seed
	@seed=$${BASTION_FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "BASTION_FUZZ_SEED=$$seed"; \
	BASTION_FUZZ_SEED=$$seed BASTION_FUZZ_SECONDS=$${BASTION_FUZZ_SECONDS:-600} \
		$(BIN)/pytest tests/test_money_fuzz.py -x -q

bench: $(STAMP)  ## gateway benchmark (bench/README.md); options: make bench ARGS="--quick --scale"
	$(BIN)/python -m bench.run $(ARGS)

bench-routing: $(STAMP)  ## routing policies on 4 simulated vLLM replicas (bench/routing.py), ~7 min; e.g. ARGS="--quick"
	$(BIN)/python -m bench.routing $(ARGS)

soak: $(STAMP)  ## 30-minute soak of one gateway (bench/soak.py); e.g. make soak ARGS="--minutes 5"
	$(BIN)/python -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache examples/node/node_modules
