# Agent Keys: `make run` starts the proxy, `make test` runs the whole suite. Both install first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The best interpreter on this machine: 3.12+ on PATH, then pyenv's 3.12+, then 3.11 (mitmproxy 11).
PYTHON ?= $(shell scripts/find-python)

.PHONY: install run test bench lint clean redis-server

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Agent Keys needs Python >= 3.11 (3.12+ recommended); none found on PATH or under pyenv" >&2; exit 1; }
	@echo "using $(PYTHON) ($$($(PYTHON) --version))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: install
	$(VENV)/bin/agentkeys serve --config agentkeys.yaml

test: install redis-server
	$(PY) -m pytest -q tests

# The Redis tests start their own throwaway redis-server; install Debian's if the machine has none.
redis-server:
	@command -v redis-server >/dev/null || { command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || \
		{ echo "error: the tests need redis-server (apt-get install redis-server)" >&2; exit 1; }; }

bench: install redis-server
	$(PY) bench/bench.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var
