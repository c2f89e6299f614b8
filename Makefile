# `make run` and `make test` are the whole set-up: each creates .venv first when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) launch/plan.py --grid 21x90x160 --steps 50 --budget 0.5 --spatial-multiple 2 --synthetic-sketch 0
	$(PY) launch/plan.py --grid 21x90x160 --steps 50 --budget 0.5 --spatial-multiple 2 --synthetic-sketch 0 --json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/planner.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
