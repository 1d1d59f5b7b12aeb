# Whimbrel's front door. `make help` lists the targets.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/whimbrel/v1/*.proto)
BENCH ?=

.PHONY: help setup proto proto-check fmt lint typecheck test test-fast bench demo clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## Create .venv with Whimbrel (editable) and the dev tools

proto: $(STAMP) ## Regenerate the committed Python code from proto/
	$(PY) tools/protogen.py .

proto-check: $(STAMP) ## Fail when the committed generated code differs from proto/
	$(PY) tools/protogen.py --check .

fmt: $(STAMP) ## Format and autofix
	$(VENV)/bin/ruff format coordinator hostd whimbrel tools tests
	$(VENV)/bin/ruff check --fix coordinator hostd whimbrel tools tests

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check coordinator hostd whimbrel tools tests
	$(VENV)/bin/ruff format --check coordinator hostd whimbrel tools tests

typecheck: $(STAMP) ## strict mypy
	$(VENV)/bin/mypy

test: $(STAMP) ## Lint, typecheck, proto drift check, then every test tier
	$(MAKE) --no-print-directory lint typecheck proto-check
	$(VENV)/bin/pytest

bench: $(STAMP) ## Run the benchmarks (BENCH=name for one); one JSON object per line
	$(PY) -m tools.bench $(BENCH)

demo: $(STAMP) ## Start a coordinator on .demo/ and show it doing its job
	$(PY) -m tools.demo

clean: ## Remove the venv, caches and demo state
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
