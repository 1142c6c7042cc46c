# `make test` and `make demo` work on a fresh clone with nothing installed: the
# virtual environment is created on first use and re-synced whenever
# pyproject.toml or constraints.txt changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: `make demo` needs only the package; `make test` adds the reference libraries
# (torch, transformers, open_clip: several GB) that the parity tests compare against.
STAMP := $(VENV)/.install-stamp
TEST_STAMP := $(VENV)/.install-test-stamp
# Eight simulated CPU devices, the mesh every test runs on.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: install test test-slow demo bench-loss clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(TEST_STAMP)

# Two worker processes, one per core (much of the suite is single-threaded compilation);
# each test file stays on one worker, so its module fixtures are built once. `make test` is
# every test but the end-to-end runs marked `slow` (several trainings each: the demo smoke test,
# two-process runs, kill -9 and stage resumes), which `make test-slow` runs; CI runs both.
test: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -n 2 --dist loadfile --durations=10 -m "not slow"

test-slow: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -n 2 --dist loadfile --durations=10 -m slow

# Trains the demo config from scratch (a fresh workdir each time), evaluates zero-shot
# classification and retrieval on the held-out demo split, prints the table, writes the plot.
# Two simulated devices, one per core of the 2-core machine: the ring loss still runs across
# devices, at twice the steps per second of eight.
DEMO_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu
demo: $(STAMP)
	rm -rf workdir/demo
	$(DEMO_ENV) $(VENV)/bin/big-contrast train --config configs/demo.py --workdir workdir/demo

bench-loss: $(STAMP)
	$(PY) experiments/loss_scaling/run.py

clean:
	rm -rf $(VENV) .pytest_cache
