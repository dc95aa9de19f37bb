# make test: .venv with the project installed, then the whole test suite (what CI runs).
# make demo: the whole job on scikit-learn's handwritten digits (jobs/demo.sh), 8 min on 2 CPU cores once the venv is installed.
# make demo-s3: the same job through a bucket of a SeaweedFS S3 server on 127.0.0.1 (jobs/demo-s3.sh).
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

# make wheelhouse: the wheels of the project and of all it needs, for Python $(PY) on manylinux x86-64 with
# DALI's $(DALI) build (DALI=cuda120 for CUDA 12 drivers), into $(WHEELHOUSE), for machines that reach no
# package index: there, `pip install --no-index --find-links wheelhouse "alexnet-pipeline[test,cuda130]"`
# installs what is missing and keeps a torch already there (any torch>=2.4, CUDA builds included).
WHEELHOUSE ?= wheelhouse
PY ?= 3.12
PLATFORMS ?= manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64

.PHONY: test demo demo-s3 gpu-check wheelhouse clean

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

demo-s3: $(BIN)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash jobs/demo-s3.sh

gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m trainer.gpu_check --out gpu-check

wheelhouse:
	$(PYTHON) -m pip wheel --no-deps --wheel-dir $(WHEELHOUSE) .
	$(PYTHON) -m pip download --dest $(WHEELHOUSE) --only-binary=:all: --python-version $(PY) \
		$(addprefix --platform ,$(PLATFORMS)) "$$(ls $(WHEELHOUSE)/alexnet_pipeline-*.whl | tail -1)[test,$(DALI)]"
	@echo "then, without an index: pip install --no-index --find-links $(WHEELHOUSE) 'alexnet-pipeline[test,$(DALI)]'"

clean:
	rm -rf $(VENV) build *.egg-info data runs gpu-check wheelhouse
