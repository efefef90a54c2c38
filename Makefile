# `make run`: set up .venv with the core requirements and start the server.
#             Server flags go in ARGS: make run ARGS="--port 9000 -v"
# `make test`: set up .venv with the test tools too and run the whole suite.
#             Narrow it with PYTEST_ARGS: make test PYTEST_ARGS="tests/test_relay.py -x"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test setup setup-dev system-deps bench lint doctor smoke

run: setup
	$(PY) -m api $(ARGS)

test: setup-dev system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

# nginx-rtmp, chromium, xvfb and nats-server for the RTMP, browser, desktop and cluster tests
# (they skip without them; .ci/install-system-deps lists every package)
system-deps:
	@sh .ci/install-system-deps || echo "warning: could not install the system packages (.ci/install-system-deps); the RTMP, browser, desktop and cluster tests will skip"

setup: $(VENV)/.core-installed
setup-dev: $(VENV)/.dev-installed

# The project itself, editable, with its core dependencies (pyproject.toml reads
# requirements.txt). The stamp is written only when the doctor finds every core
# requirement and every module of the project importable, so a broken install
# is retried by the next `make run` instead of being taken for done.
$(VENV)/.core-installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PY) -m api.doctor --core
	touch $@

# torch==2.13.0 first, alone: pip then takes the CPU build on local disk
# instead of resolving an unpinned torch to a multi-GB CUDA download.
$(VENV)/.dev-installed: $(VENV)/.core-installed requirements-dev.txt requirements-diffusion.txt
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q torch==2.13.0 && $(PIP) install -q -r requirements-diffusion.txt
	touch $@

# What CI proves on every submission: a fresh clone's `make run` serves frames.
smoke:
	$(PYTHON) .ci/smoke.py

bench: setup-dev
	$(PY) bench/relay.py --quick
	$(PY) bench/worker.py
	$(PY) bench/engine.py
	$(PY) bench/e2e.py --quick
	$(PY) bench/whep_fanout.py --viewers 1,4 --seconds 4

doctor: setup
	$(PY) -m api.doctor

# ruff's rules, ruff's formatting, and mypy over the files listed in pyproject.toml
lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
