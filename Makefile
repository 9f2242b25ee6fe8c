# The two commands of the README: `make demo` (the main job) and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0  # the CPU build first, exactly this version
	$(BIN)/python -m pip install -q -e ".[full,dev]"
	touch $@

demo: install
	$(BIN)/instaflow-edge generate --prompt "a red circle above a blue square" --seed 0 --out instaflow.png

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest
