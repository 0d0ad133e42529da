# Two commands on a fresh machine: `make demo` (install + offline run) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds pip finds on this project's machines (see README).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tokbench run --method random --ratio 0.25 --task vstar-synth \
		--model tiny-qwen2.5-vl --limit 40 --batch-size 4

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	$(PY) bench/overhead.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
