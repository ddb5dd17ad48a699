# lcplug: `make test` and `make demo` work from a fresh clone (they create .venv and install everything).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup test lint demo quickstart clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The CPU build of torch goes in first, pinned, so that resolving the project's `torch>=` range never
# pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python examples/demo/retrofit.py

quickstart: setup
	$(BIN)/python examples/quickstart.py

clean:
	rm -rf $(VENV) build *.egg-info
