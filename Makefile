# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test setup setup-test system-deps bench audit reliability

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

# Known-vulnerability audit of the installed dependency set (pip-audit on PyPI's vulnerability data,
# plus offline OSV matching with ADVISORIES=path/to/pypa-advisory-database). A script step, not part
# of `make test`: PyPI's per-release JSON API that pip-audit needs is not reachable on these machines
# (docs/reliability.md).
audit: setup-test
	$(BIN)/pip install -q -e '.[audit]'
	$(BIN)/python scripts/audit_deps.py $(if $(ADVISORIES),--advisories $(ADVISORIES))

# Hostile-input, load and SIGKILL reliability of the HTTP service (loopback, ~15 min; docs/reliability.md).
reliability: setup-test system-deps
	@if [ -s .postgres_url ]; then export CELLATLAS_TEST_POSTGRES_URL="$$(tail -n 1 .postgres_url)"; fi; \
	$(BIN)/python benchmarks/reliability.py
