# Agent Keys: `make run` starts the proxy, `make test` runs the whole suite. Both install first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The best interpreter on this machine: 3.12+ on PATH, then pyenv's 3.12+, then 3.11 (mitmproxy 11).
PYTHON ?= $(shell scripts/find-python)

# The Node SDK the namespace tests run as an agent, pinned (7.x needs Node 22; the machine has Node 20).
NODE_OPENAI := openai@6.49.0
NODE_DIR := $(VENV)/node
IMAGE ?= localhost/agentkeys:dev

.PHONY: install run test bench bench-peers bench-purge bench-audit bench-limits lint clean redis-server faketime iptables node-sdk image image-test dashboard-check mutants compat

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

# One pytest worker per core; a test file runs whole in one worker, so its module fixtures start once.
test: install redis-server faketime iptables node-sdk
	$(PY) -m pytest -q -n auto --dist loadfile tests

# The Redis tests start their own throwaway redis-server; install Debian's if the machine has none.
redis-server:
	@command -v redis-server >/dev/null || { command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || \
		{ echo "error: the tests need redis-server (apt-get install redis-server)" >&2; exit 1; }; }

# The clock-skew tests run one proxy replica under Debian's faketime; skipped without it.
faketime:
	@ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || { command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq faketime >/dev/null) || \
		echo "warning: no faketime: the clock-skew tests will be skipped (apt-get install faketime)" >&2; }

# The namespace tests (tests/test_netns.py) write REDIRECT rules; install Debian's iptables if absent.
iptables:
	@command -v iptables >/dev/null || { command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq iptables >/dev/null) || \
		echo "warning: no iptables: the namespace tests will be skipped (apt-get install iptables)" >&2; }

# The Node openai SDK, for the namespace tests' Node agent; skipped (and so are those tests) without npm.
node-sdk: $(NODE_DIR)/node_modules/openai/package.json

$(NODE_DIR)/node_modules/openai/package.json:
	@command -v npm >/dev/null || { echo "warning: no npm: the Node SDK tests will be skipped" >&2; exit 0; }; \
		mkdir -p $(NODE_DIR) && npm install --silent --no-audit --no-fund --prefix $(NODE_DIR) $(NODE_OPENAI)

bench: install redis-server
	$(PY) bench/bench.py
	$(PY) bench/bench_scale.py

# A million expired keys in each store, purged while calls go on: what the purge adds to a call, and
# start-up and memory with that many keys. Several minutes (writing the keys is most of it).
bench-purge: install redis-server
	$(PY) bench/bench_purge.py

# Agent Keys beside Portkey's open-source gateway (Node; no keys or budgets) on the same mock: the
# gateway is installed from npm into a temporary folder, removed afterwards.
PORTKEY := @portkey-ai/gateway@1.15.2

bench-peers: install
	@command -v npm >/dev/null || { echo "error: bench-peers needs npm and node (Portkey's gateway is a Node package)" >&2; exit 1; }
	@peers=$$(mktemp -d) && trap 'rm -rf "$$peers"' EXIT && \
		npm install --silent --no-audit --no-fund --prefix "$$peers" $(PORTKEY) && \
		$(PY) bench/bench_peers.py --portkey "$$peers/node_modules/@portkey-ai/gateway"

# The container image, with podman; the base is made from Debian's packages if no registry is reachable.
image:
	timeout 1800 scripts/build-image

# Run the built image as a team would: mounted config, state in a volume, a call through it, its HEALTHCHECK.
image-test: install
	AGENTKEYS_IMAGE=$(IMAGE) timeout 600 $(PY) -m pytest -q -p no:randomly tests/test_image.py

# Every query of the Grafana dashboard against a real Prometheus scraping a real proxy under a short load.
dashboard-check: install
	@command -v prometheus >/dev/null || { command -v apt-get >/dev/null && \
		(apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) || \
		{ echo "error: dashboard-check needs prometheus (apt-get install prometheus)" >&2; exit 1; }; }
	AGENTKEYS_DASHBOARD_CHECK=1 timeout 300 $(PY) -m pytest -q -p no:randomly tests/test_dashboard.py

# Rate limits alone: what a key with limits adds to a call's admission and settlement in the gate.
bench-limits: install redis-server
	$(PY) bench/bench_limits.py

# The audit log alone: per-record cost of chaining and signing, and report/verify/tail on a million records.
bench-audit: install
	$(PY) bench/bench_audit.py

# Mutation testing of the modules that decide money and permissions (the list: [tool.mutmut] in
# pyproject.toml). Not part of `make test`: it takes minutes. mutmut looks for a package under ./src
# only, so it runs in var/mutants/ on a fresh copy; `mutants/` there keeps each mutant for `mutmut show`.
MUTMUT := mutmut==3.8.1
MUTANTS_DIR := var/mutants

mutants: install
	$(PY) -m pip install --quiet $(MUTMUT)
	rm -rf $(MUTANTS_DIR) && mkdir -p $(MUTANTS_DIR)/src
	cp -r addon/agentkeys $(MUTANTS_DIR)/src/
	cp -r tests policies agentkeys.yaml pyproject.toml $(MUTANTS_DIR)/
	cd $(MUTANTS_DIR) && AGENTKEYS_TIKTOKEN_DIR=$(abspath addon/agentkeys/data/tiktoken) \
		$(abspath $(VENV))/bin/mutmut run --max-children $$(nproc) && \
		$(abspath $(VENV))/bin/mutmut results > survivors.txt; \
		$(abspath $(VENV))/bin/mutmut export-cicd-stats >/dev/null && cat mutants/mutmut-cicd-stats.json
	@echo "surviving mutants: $(MUTANTS_DIR)/survivors.txt (see one: cd $(MUTANTS_DIR) && ../../$(VENV)/bin/mutmut show NAME)"

# The agent frameworks people use (compat/requirements/*.txt and compat/package.json, pinned), unchanged, through
# the proxy in both modes against the mock provider; prints a table framework x mode. Not part of `make test`:
# the installs are heavy. Each Python framework gets its own venv under var/compat (their pins conflict with
# one another, as they would in no single agent); the Node ones go in a temporary folder.
COMPAT_VENVS := var/compat
COMPAT_STAMPS := $(patsubst compat/requirements/%.txt,$(COMPAT_VENVS)/%/.installed,$(wildcard compat/requirements/*.txt))

compat: install $(COMPAT_STAMPS)
	@node_dir=$$(mktemp -d -t agentkeys-compat-node-XXXXXX); trap 'rm -rf "$$node_dir"' EXIT; \
	if command -v npm >/dev/null; then \
		cp compat/package.json "$$node_dir/" && npm install --silent --no-audit --no-fund --prefix "$$node_dir" && \
		node_arg="--node-modules $$node_dir"; \
	else echo "warning: no npm: the Node frameworks are skipped" >&2; fi; \
	timeout 3600 $(PY) compat/run.py --venvs $(COMPAT_VENVS) $$node_arg

$(COMPAT_VENVS)/%/.installed: compat/requirements/%.txt
	@test -x $(COMPAT_VENVS)/$*/bin/python || $(PYTHON) -m venv $(COMPAT_VENVS)/$*
	$(COMPAT_VENVS)/$*/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENVS)/$*/bin/python -m pip install --quiet -r $<
	@touch $@

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var
