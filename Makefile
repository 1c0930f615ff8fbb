# Two commands do all set-up: `make demo` (the main job) and `make test` (the tests).
# Both create or reuse the virtual environment in .venv.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision, open_clip, timm"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/flyp compare recipes/pacs.yaml --out runs/pacs-compare

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
