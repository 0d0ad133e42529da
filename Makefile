# Two commands on a fresh machine: `make demo` (install + offline run) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds pip finds on this project's machines (see README).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# The canary regression cell grid (docs/canary.md): every method at three budgets, GlimpsePrune also dynamic.
# FastV, PyramidDrop, DART and SparseVLM budget layer-averaged retention; with the canary's 4 LLM layers
# only 0.5 is reachable, with their earliest settings (k=1; four equal stages; layers 0/1/2).
CANARY_METHODS := random,pool,downsample,glimpseprune,visionzip,divprune,cdpruner,vscan,vispruner
CANARY_ARGS := --task vstar-synth --model tiny-qwen2.5-vl --limit 60 --batch-size 10
CANARY_OUT ?= results/canary
CANARY_BASELINE := results/baselines/canary-tiny-qwen2.5-vl.json

.PHONY: install demo test bench canary regress canary-baseline clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench run --method glimpseprune --task vstar-synth \
		--model tiny-qwen2.5-vl --limit 100 --batch-size 10

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	$(PY) bench/overhead.py --quick

canary: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench sweep --methods $(CANARY_METHODS) --ratios 0.1,0.25,0.5 \
		$(CANARY_ARGS) --output $(CANARY_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench run --method glimpseprune $(CANARY_ARGS) --output $(CANARY_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench run --method fastv --ratio 0.5 --method-arg k=1 $(CANARY_ARGS) --output $(CANARY_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench run --method pyramiddrop --ratio 0.5 --method-arg early_layer=0 \
		$(CANARY_ARGS) --output $(CANARY_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench run --method dart --ratio 0.5 --method-arg k=1 $(CANARY_ARGS) --output $(CANARY_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench run --method sparsevlm --ratio 0.5 $(CANARY_ARGS) --output $(CANARY_OUT)

regress: canary
	$(VENV)/bin/tokbench regress $(CANARY_OUT) --baseline $(CANARY_BASELINE) --timing off

canary-baseline: canary
	$(VENV)/bin/tokbench regress $(CANARY_OUT) --write-baseline $(CANARY_BASELINE)

clean:
	rm -rf $(VENV) .pytest_cache
