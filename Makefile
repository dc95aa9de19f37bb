# make test: .venv with the project installed, then the whole test suite (what CI runs).
# make demo: the whole job on scikit-learn's handwritten digits (jobs/demo.sh), ~11 min on 2 CPU cores.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without a GPU the CPU build of torch; with one, whatever `torch>=2.4` resolves to (a CUDA build).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH := $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)

.PHONY: test demo clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash jobs/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info data runs
