# Two commands do everything on a fresh machine: `make train` and `make test`.
# Each creates .venv in the repo root if missing and (re)installs only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/default
CONFIG ?= configs/default.py

.PHONY: train test lint format clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.train-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[train]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet 'torch==2.13.0'
	$(PIP) install --quiet -e '.[train,test]'
	touch $@ $(VENV)/.train-installed

train: $(VENV)/.train-installed
	$(PY) -m train.main --config=$(CONFIG) --workdir=$(WORKDIR)

# One BLAS thread: LAPACK's SVDs oversubscribe 2 cores otherwise (10-30x slower when loaded).
test: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -x --durations=15 tests

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.test-installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache data/tfds
