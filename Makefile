# Entry points (see README): `make demo`, `make test` (CI) and `make test-fast`. Each creates the
# virtual environment and install the package on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast install clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/tf-sparsity demo --output demo_out

test: install
	$(BIN)/python -m pytest -q

# The fast lane (< 2 minutes on 2 cores): no training beyond a few steps, no subprocesses.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_out .pytest_cache
