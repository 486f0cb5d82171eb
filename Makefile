# Two commands do everything on a fresh machine: `make train` and `make test`.
# Each creates .venv in the repo root if missing and (re)installs only when pyproject.toml changes.
# The wheel holds only the library (galore_jax); the trainer (train/, configs/) and benchmarks/
# run from this checkout, which a .pth file puts on the venv's sys.path (from any directory).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/default
CONFIG ?= configs/default.py

CHECKOUT_PTH = $(PY) -c "import pathlib, sysconfig; \
  pathlib.Path(sysconfig.get_paths()['purelib'], 'galore_jax_checkout.pth').write_text('$(CURDIR)')"

.PHONY: train test lint format clean bench docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.train-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[train]'
	$(CHECKOUT_PTH)
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet 'torch==2.13.0'
	$(PIP) install --quiet -e '.[train,test,docs]'
	$(CHECKOUT_PTH)
	touch $@ $(VENV)/.train-installed

train: $(VENV)/.train-installed
	$(PY) -m train.main --config=$(CONFIG) --workdir=$(WORKDIR)

# One BLAS thread: LAPACK's SVDs oversubscribe 2 cores otherwise (10-30x slower when loaded).
test: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -x --durations=15 tests
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q --doctest-modules galore_jax

# The documentation site (docs/_build/html), warnings as errors; offline (no intersphinx).
docs: $(VENV)/.test-installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.test-installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache data/tfds docs/_build docs/_autosummary docs/benchmarks build dist
