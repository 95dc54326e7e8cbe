# villagemesh: `make demo` and `make test` work on a fresh machine (they make .venv themselves).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the test suite needs; installed only when missing (CI runs as root).
# chromium + chromium-driver: the dashboard's end-to-end test drives a real headless browser.
# gcc + libgmp-dev: py-libp2p (the interop peer) pins fastecdsa, which builds from source.
# iproute2: the network-namespace lab (tests/lab, make chaos).
# dbus-daemon: the private system bus the BitChat BLE tests run bleak on (a fake bluetoothd, python-dbusmock);
# libdbus-1-dev + libglib2.0-dev + pkg-config: dbus-python (python-dbusmock's dependency) builds from source.
SYSTEM_PACKAGES := python3-venv chromium chromium-driver gcc libgmp-dev dbus-daemon libdbus-1-dev libglib2.0-dev pkg-config iproute2
# Debian packages only the benchmarks need (NATS JetStream, the durable-broker anchor of benchmarks/delivery.py).
BENCH_SYSTEM_PACKAGES := nats-server
# py-libp2p, the real peer of the libp2p interop tests, in a venv of its own (it pins ~70 packages).
LIBP2P_VENV := .venv-libp2p
LIBP2P_STAMP := $(LIBP2P_VENV)/.installed
LIBP2P_VERSION := 0.8.1

.PHONY: demo test lint typecheck bench chaos sysdeps benchsysdeps install-debs clean

sysdeps:
	@$(MAKE) --no-print-directory install-debs DEBS="$(SYSTEM_PACKAGES)"

benchsysdeps:
	@$(MAKE) --no-print-directory install-debs DEBS="$(BENCH_SYSTEM_PACKAGES)"

install-debs:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): setup.cfg pyproject.toml tools/typing_tree.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) tools/typing_tree.py
	touch $(STAMP)

$(LIBP2P_STAMP):
	$(PYTHON) -m venv $(LIBP2P_VENV)
	$(LIBP2P_VENV)/bin/python -m pip install -q --upgrade pip
	$(LIBP2P_VENV)/bin/python -m pip install -q libp2p==$(LIBP2P_VERSION)
	touch $(LIBP2P_STAMP)

demo: $(STAMP)
	$(VENV)/bin/villagemesh demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy villagemesh actors supervision protocols

# pytest's exit 5 (no test collected) is a failure here, not a pass.
test: sysdeps $(STAMP) $(LIBP2P_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy villagemesh actors supervision protocols
	rm -f .coverage .coverage.*
	set +e; HYPOTHESIS_PROFILE=ci $(VENV)/bin/coverage run -m pytest -p no:cacheprovider; rc=$$?; set -e; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report --include='protocols/*' --fail-under=100
	$(VENV)/bin/coverage report --include='supervision/*,actors/*,villagemesh/*' --skip-covered | tail -n 3

bench: benchsysdeps $(STAMP) $(LIBP2P_STAMP)
	for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# A long seeded chaos run in network namespaces (root): it prints its seed; CHAOS_SEED=S replays one.
CHAOS_SECONDS ?= 60
CHAOS_HOSTS ?= 6
chaos: $(STAMP)
	$(PY) -m villagemesh.lab.chaos --duration $(CHAOS_SECONDS) --hosts $(CHAOS_HOSTS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

clean:
	rm -rf $(VENV) $(LIBP2P_VENV) build *.egg-info .coverage .coverage.* .hypothesis
