# `make run` and `make test` are the whole set-up: each creates .venv first when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TINY_WAN := build/tiny-wan
DEMO_MODEL ?= models/dvg-demo-wan
CPU_DEMO_MODEL := models/dvg-demo-wan-cpu
PROMPT ?= a red disc moving quickly right over a plain black background

.PHONY: run demo-compare fidelity fidelity-cpu plan test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c constraints.txt -e ".[dev,ray,xfuser,deepspeed]"
	touch $(STAMP)

$(TINY_WAN)/model_index.json: | $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) launch/make_tiny_checkpoint.py --family wan --out $(TINY_WAN) --overwrite

# The main job: DVG on the committed demo model (a small Wan trained on procedural clips: launch/train_demo.py),
# one video of a dataset-style caption in out/. DEMO_MODEL=$(CPU_DEMO_MODEL) takes the model trained here on CPU.
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) launch/generate.py --config configs/demo-wan.yaml --model $(DEMO_MODEL) \
		--prompt "$(PROMPT)" --mode dvg --budget 0.5 --out out --save-latent

# The fidelity table and contact sheet (bench/results/fidelity.json, fidelity_contact.png): full vs dvg and its
# ablations at budgets 0.5 and 0.6 on the demo model's 32 held-out captions, two seeds each.
fidelity: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/fidelity.py --config configs/demo-wan.yaml --captions 32 --seeds 0,1 \
		--budgets 0.5,0.6

# The same on the model trained here in 30 minutes on 2 CPU cores.
fidelity-cpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/fidelity.py --config configs/demo-wan.yaml --model $(CPU_DEMO_MODEL) --captions 32 \
		--seeds 0,1 --budgets 0.5,0.6 --out bench/results/fidelity_cpu.json

demo-compare: fidelity

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
