# Two entry points for a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= disabled
export WANDB_SILENT := true

.PHONY: install test test-slow test-gpu lint format demo bench bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[recipes,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: $(STAMP)  # the demo config (best quality, densification), then its faithful variant (fidelity <= 1%)
	$(VENV)/bin/lightning-picard demo
	$(VENV)/bin/lightning-picard demo --config recipes/configs/demo/dreamgaussian-faithful.yaml

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

bench-gpu: $(STAMP)  # on a CUDA machine: every GPU figure docs/benchmarks.md owes, into outputs/gpu_session
	$(PY) benchmarks/gpu_session.py --out outputs/gpu_session

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
