# `make run`: set up and start the server (relay + a local worker).
# `make test`: set up and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test setup setup-dev system-deps bench lint doctor

run: setup
	$(PY) -m api

test: setup-dev system-deps
	$(PY) -m pytest -q

# nginx-rtmp and chromium for the RTMP and browser tests (they skip without them)
system-deps:
	@sh .ci/install-system-deps || echo "warning: could not install nginx-rtmp/chromium; their tests will skip"

setup: $(VENV)/.core-installed
setup-dev: $(VENV)/.dev-installed

$(VENV)/.core-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

# torch==2.13.0 first, alone: pip then takes the CPU build on local disk
# instead of resolving an unpinned torch to a multi-GB CUDA download.
$(VENV)/.dev-installed: $(VENV)/.core-installed requirements-dev.txt $(wildcard requirements-diffusion.txt)
	$(PIP) install -q -r requirements-dev.txt
	if [ -f requirements-diffusion.txt ]; then $(PIP) install -q torch==2.13.0 && $(PIP) install -q -r requirements-diffusion.txt; fi
	touch $@

bench: setup-dev
	$(PY) bench/relay.py --quick
	$(PY) bench/worker.py
	$(PY) bench/engine.py
	$(PY) bench/e2e.py --quick
	$(PY) bench/whep_fanout.py --viewers 1,4 --seconds 4

doctor: setup
	$(PY) -m api.doctor

lint: setup-dev
	$(VENV)/bin/ruff check .
