# `make demo`: set up and run the demo pipeline.  `make test`: set up and run the tests.
# A CUDA machine: install your CUDA torch into .venv first (see README); it is kept.
VENV ?= .venv
PY := $(VENV)/bin/python
# Bytecode is compiled on first import instead, only for the modules that are imported, and kept:
# with PYTHONDONTWRITEBYTECODE set (as on some machines) every stage would compile torch, diffusers
# and the rest again (7 s of each stage's start, measured on the demo's extract).
PIP := $(PY) -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
# DVC stages call `python`: make it the project's interpreter.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup setup-test demo test

setup: $(VENV)/.installed

# The test tools and the object-store packages (s3://) on top of setup.
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -r requirements-nodeps.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) -r requirements-test.txt
	touch $@

demo: setup
	dvc repro

test: setup-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q
