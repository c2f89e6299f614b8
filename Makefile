# `make run` and `make test` are the whole set-up: each creates .venv first when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TINY_WAN := build/tiny-wan
PROMPT ?= a red ball rolling over green grass, slow motion

.PHONY: run plan test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c constraints.txt -e ".[dev,ray,xfuser,deepspeed]"
	touch $(STAMP)

$(TINY_WAN)/model_index.json: | $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) launch/make_tiny_checkpoint.py --family wan --out $(TINY_WAN) --overwrite

# The main job: DVG on the tiny random-weight Wan checkpoint (built on first use), one video in out/.
run: $(STAMP) $(TINY_WAN)/model_index.json
	HF_HUB_OFFLINE=1 $(PY) launch/generate.py --config configs/tiny-wan.yaml --prompt "$(PROMPT)" \
		--mode dvg --budget 0.5 --out out --save-latent

# The planner alone, for a Wan-720p latent (words, then JSON).
plan: $(STAMP)
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
	$(PY) bench/speedup.py
	$(PY) bench/parallel.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build out
