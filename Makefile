# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test setup setup-test system-deps bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e .

# torch==2.13.0 resolves to the CPU wheel on these machines; a bare `torch` would pull CUDA.
setup-test: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,foundation]'

# PostgreSQL (ledger tests) and Chromium (browser tests) from Debian; needs root + apt.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  bash scripts/ci_postgres.sh > .postgres_url && bash scripts/ci_browser.sh; \
	else echo "system-deps: not root or no apt-get; PostgreSQL and browser tests will skip"; fi

demo: setup
	$(BIN)/cellatlas demo

test: setup-test system-deps
	@if [ -s .postgres_url ]; then export CELLATLAS_TEST_POSTGRES_URL="$$(tail -n 1 .postgres_url)"; fi; \
	$(BIN)/python -m pytest -q

bench: setup-test
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/accuracy.py
	$(BIN)/python benchmarks/throughput.py
