# `make demo`: set up and run the demo pipeline.  `make test`: set up and run the tests.
# A CUDA machine: install your CUDA torch into .venv first (see README); it is kept.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
# DVC stages call `python`: make it the project's interpreter.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	dvc repro

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q
