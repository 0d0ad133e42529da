# Two commands on a fresh machine: `make demo` (install + offline run) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds pip finds on this project's machines (see README).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# The canary regression cell grid (docs/canary.md), on the 12-layer canary: every method at 0.1 and 0.25
# (GlimpsePrune also dynamic). In-LLM methods run at their papers' schedules (FastV k=2, PyramidDrop's
# four stages, DART k=2, SparseVLM's layers scaled to depth); at 0.1, a layer-averaged retention those
# schedules cannot reach on 12 layers, FastV and DART prune after layer 1 of 12 (the papers' K=2 of 32 is
# the same share of depth) and PyramidDrop's first stage ends at layer 1; SparseVLM cannot reach 0.1.
CANARY_METHODS := random,pool,downsample,glimpseprune,visionzip,divprune,cdpruner,vscan,vispruner
CANARY_IN_LLM := fastv,pyramiddrop,dart,sparsevlm
CANARY_MODEL := tiny-qwen2.5-vl-deep
CANARY_ARGS := --task vstar-synth --model $(CANARY_MODEL) --limit 60 --batch-size 10
CANARY_OUT ?= results/canary
CANARY_BASELINE := results/baselines/canary-$(CANARY_MODEL).json

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
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench sweep --methods $(CANARY_METHODS) --ratios 0.1,0.25 $(CANARY_ARGS) --output $(CANARY_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench sweep --methods $(CANARY_IN_LLM) --ratios 0.25 $(CANARY_ARGS) --output $(CANARY_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench sweep --methods fastv,pyramiddrop,dart --ratios 0.1 --method-arg fastv:k=1 \
		--method-arg pyramiddrop:early_layer=1 --method-arg dart:k=1 $(CANARY_ARGS) --output $(CANARY_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench run --method glimpseprune $(CANARY_ARGS) --output $(CANARY_OUT)

regress: canary
	$(VENV)/bin/tokbench regress $(CANARY_OUT) --baseline $(CANARY_BASELINE) --timing off

canary-baseline: canary
	$(VENV)/bin/tokbench regress $(CANARY_OUT) --write-baseline $(CANARY_BASELINE)

clean:
	rm -rf $(VENV) .pytest_cache
