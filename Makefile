# Two commands do all set-up: `make demo` (the main job) and `make test` (the tests).
# Both create or reuse the virtual environment in .venv.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# PACS is read in place: data.root, else $FLYP_PACS_ROOT, else ../shared/data/pacs next to the
# checkout (the package knows no other place). A clone made elsewhere on this workplace's
# machines finds the shared copy through this default.
ifeq ($(origin FLYP_PACS_ROOT), undefined)
ifeq ($(wildcard ../shared/data/pacs),)
ifneq ($(wildcard /work/shared/data/pacs),)
export FLYP_PACS_ROOT := /work/shared/data/pacs
endif
endif
endif

.PHONY: demo test lint install usage

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision, open_clip, timm"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/flyp compare recipes/pacs_demo.yaml --seeds 0 1 2 --soups --out runs/pacs-demo

# The README's "Using it" walkthrough: run it in a scratch clone, write what it prints into
# README.md (between the usage markers) and docs/readme_usage.json (a few minutes).
usage: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/readme_usage.py

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
