# Two commands on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_STAMP := $(VENV)/.run-installed
DEV_STAMP := $(VENV)/.dev-installed
SERVE_ARGS ?=
# `make run` keeps its jobs and job store in the checkout unless told otherwise.
export EXECUTOR_WORK_DIR ?= $(CURDIR)/.work

.PHONY: run test lint bench docs system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The service and the CPU stand-in backend (torch + torch-xla). A venv that already has
# torch (an instance's Neuron venv) keeps its own: nothing here reinstalls it.
# Then what generated scripts import (requirements-jobs.txt), with the venv's torch
# packages pinned, so torchvision matches that torch and nothing replaces it.
TORCH_PINS := $(VENV)/.torch-constraints
$(RUN_STAMP): $(PY) requirements.txt requirements-xla.txt requirements-jobs.txt pyproject.toml
	$(PIP) install --quiet -r requirements.txt
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -r requirements-xla.txt
	$(PIP) freeze --all | grep -Ei '^(torch|torch-xla|torch_xla|torch-neuronx|torch_neuronx|neuronx-cc|libneuronxla)==' > $(TORCH_PINS)
	$(PIP) install --quiet -c $(TORCH_PINS) -r requirements-jobs.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

# The tests also run a real Ray cluster (requirements-cluster.txt); `make run` never needs it.
$(DEV_STAMP): $(RUN_STAMP) requirements-dev.txt requirements-cluster.txt
	$(PIP) install -r requirements-dev.txt -r requirements-cluster.txt
	touch $@

run: $(RUN_STAMP)
	$(PY) -m executor_service serve $(SERVE_ARGS)

# Tools the tests call that are not Python packages (shellcheck, systemd-analyze).
system-deps:
	@bash deployment/system-deps.sh $(PY)

test: $(DEV_STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(DEV_STAMP) requirements-bench.txt
	$(PIP) install -r requirements-bench.txt
	touch $@

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.dashboard

# The settings table in docs/configuration.md, from the settings' declarations.
docs: $(RUN_STAMP)
	$(PY) -m executor_service.config --write docs/configuration.md

clean:
	rm -rf $(VENV) build *.egg-info
