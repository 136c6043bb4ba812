# One-command set-up for a fresh machine with Python >= 3.11 and pip.
#   make demo         set up, then run the main job on the shipped model
#   make test         set up (and Debian's chromium for the app's browser test), then run the test suite
#   make app          set up, then start the Gradio app on the runs/ folder (http://127.0.0.1:7860)
#   make test-latest  the suite on the newest releases pyproject allows, in .venv-latest (drift check)
#   make lock         make test-latest, then write what it passed with into requirements.lock
#
# Every install goes through requirements.lock as pip *constraints*: the versions the suite passed
# with, nothing installed that the package does not ask for. torch is pinned there by version
# only (no +cpu / +cu128 tag), so a CUDA build of the same version fits it too.
#
# torch: on a machine without an NVIDIA GPU the CPU wheel is installed *before* the package,
# so pip never pulls the multi-GB CUDA build. With a GPU, install the CUDA build of the locked
# torch version first (see README), or pass TORCH_SPEC, e.g.
#   make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
# A torch that is already in the virtualenv is kept as it is.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
LATEST ?= .venv-latest
LOCK := requirements.lock
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PIP := python -m pip install -q
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo app browser test test-latest lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) -c $(LOCK) pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/$(PIP) -c $(LOCK) $(TORCH_SPEC)
	$(BIN)/$(PIP) -c $(LOCK) -e ".[dev,app]"
	touch $@

demo: setup
	$(BIN)/balora demo --output-dir runs/demo --overwrite true

app: setup
	$(BIN)/balora app --runs runs

# The app's browser test drives Debian's chromium through playwright (never a downloaded browser).
browser:
	command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto

# A fresh venv with the newest releases pyproject allows (no lock), except torch: which torch a
# machine gets is a choice (CPU wheel or a CUDA build), so it stays TORCH_SPEC. Prints what differs
# from the lock and which newer releases pyproject's upper bounds hold back, then runs the suite.
test-latest: browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/$(PIP) --upgrade pip
	$(LATEST)/bin/$(PIP) $(TORCH_SPEC)
	$(LATEST)/bin/$(PIP) -e ".[dev,app]"
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable > $(LATEST)/freeze.txt
	$(LATEST)/bin/python -m balora_diffusion.versions --lock $(LOCK)
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q -n auto -p no:cacheprovider

# The lock is written only from an environment the whole suite has just passed in: a freeze of it
# (pip freeze rather than a resolver such as pip-compile or uv, which would pin what PyPI serves
# for torch, a CUDA build with its nvidia-* packages, and record versions no test has run).
lock: test-latest
	{ echo "# Versions the test suite passed with (make lock: make test-latest, then pip freeze)."; \
	  echo "# Used as pip constraints by make setup. torch is pinned without its +cpu / +cuXXX tag."; \
	  echo "# Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')"; \
	  sed -E 's/^(torch==[^+]+)\+.*/\1/' $(LATEST)/freeze.txt; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) runs
