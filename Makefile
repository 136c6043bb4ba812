# One-command set-up for a fresh machine with Python >= 3.10 and pip.
#   make demo   set up, then run the main job on the shipped model
#   make test   set up, then run the test suite
#
# torch: on a machine without an NVIDIA GPU the CPU wheel is installed *before* the package,
# so pip never pulls the multi-GB CUDA build. With a GPU, install the CUDA build of your choice
# first (see README), or pass TORCH_SPEC, e.g.
#   make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
# A torch that is already in the virtualenv is kept as it is.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/balora demo --output-dir runs/demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
