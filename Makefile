# `make run` and `make test` each work as the only command on a fresh machine:
# they create .venv and install what is missing. torch goes in first, pinned to the
# CPU build, so a CPU box never pulls multi-GB CUDA wheels.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/tiny.yaml
OUT     ?= runs/demo
TORCH   ?= torch==2.13.0

.PHONY: run test install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/pagellm run --config $(CONFIG) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/data_scale.py

clean:
	rm -rf runs .pytest_cache
