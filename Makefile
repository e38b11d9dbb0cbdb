# From a fresh clone: `make demo` or `make test`. Both create .venv and install pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines get exact versions (and the CPU torch wheel); GPU users run `pip install -e .` themselves.
CONSTRAINTS ?= constraints/cpu.txt
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: demo test lint install clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# The main job on the embedded offline tiny world: KD pipeline, reference evaluations, standard table.
demo: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs mlruns mlflow.db
