# Two entry points, both usable on a fresh machine (CPU only is fine):
#   make run   - set up .venv, fetch the embedded model and corpus, run the main job (bitcliff cliff):
#                the 4 -> 3 -> 2-bit cliff, diagnosed and repaired, into runs/cliff
#   make test  - set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test venv

$(BIN)/bitcliff: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	# torch first, pinned: the CPU build 2.13.0; an unpinned torch would pull GBs of CUDA wheels
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test]"
	touch $(BIN)/bitcliff

venv: $(BIN)/bitcliff

run: venv
	$(BIN)/bitcliff cliff

test: venv
	$(BIN)/python -m pytest
