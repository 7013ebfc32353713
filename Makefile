# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   # creates .venv from the lock if missing, then runs the CPU demo
#   make test   # creates .venv (plus test-only deps), runs the fast suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check -q
CORE := $(VENV)/.core-installed
TESTDEPS := $(VENV)/.test-installed
PYTEST_ARGS ?=
# Pytest exits 5 when nothing was collected: not a failure for a filtered run.
RUN_PYTEST = rc=0; $(PYTHON) -m pytest $(1) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

.PHONY: demo test test-slow test-all bench venv clean

venv: $(CORE)

$(CORE): requirements.lock setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install --no-deps -r requirements.lock
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

# torch (CPU, test-only: parity against reference implementations).
$(TESTDEPS): $(CORE) requirements-test.lock
	$(PIP) install --no-deps -r requirements-test.lock
	touch $@

# RETRAIN_BASE=1 trains the demo's base from scratch instead of installing the shipped one.
demo: $(CORE)
	$(PYTHON) -m launch.demo $(if $(RETRAIN_BASE),--retrain_base)

test: $(TESTDEPS)
	@$(call RUN_PYTEST,-n 2 tests)

test-slow: $(TESTDEPS)
	@$(call RUN_PYTEST,-m slow tests)

test-all: $(TESTDEPS)
	@$(call RUN_PYTEST,-m "slow or not slow" -n 2 tests)

# Peer libraries (imagen-pytorch, diffusers) live in their own venv, built on first use.
bench: $(TESTDEPS)
	test -x .venv-bench/bin/python || bash bench/setup_peers.sh
	$(PYTHON) -m bench.run_all

clean:
	rm -rf $(VENV) reports workdirs
