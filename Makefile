# make test: .venv with the project installed, then the whole test suite (what CI runs).
# make demo: the whole job on scikit-learn's handwritten digits (jobs/demo.sh), ~11 min on 2 CPU cores.
# make gpu-check: on a CUDA machine, the GPU side measured into gpu-check/report.md and .json
# (trainer/gpu_check.py), with the venv's python if there is one, else $(PYTHON) as it is (a GPU
# machine that has torch with CUDA, and DALI on its PYTHONPATH).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without a GPU the CPU build of torch; with one, whatever `torch>=2.4` resolves to (a CUDA build).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH := $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
# DALI's build for the driver: cuda120 under a CUDA 12 driver, cuda130 under CUDA 13 or without a GPU
CUDA_MAJOR := $(shell nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p')
DALI ?= $(if $(filter 12,$(CUDA_MAJOR)),cuda120,cuda130)

.PHONY: test demo gpu-check clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,$(DALI)]"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash jobs/demo.sh

gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m trainer.gpu_check --out gpu-check

clean:
	rm -rf $(VENV) build *.egg-info data runs gpu-check
