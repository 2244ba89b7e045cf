# Two commands from a fresh clone:  `make demo`  and  `make test-all` (what CI runs).
# `make test` is the fast tier for development: unit + protocol + a few end-to-end runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/privmed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, exactly this version: it is a local CPU wheel (any other spec pulls CUDA).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[ml,dev]"
	touch $(BIN)/privmed

install: $(BIN)/privmed

demo: install
	$(BIN)/privmed demo

FAST := tests/unit tests/protocol tests/e2e/test_demo.py tests/e2e/test_hostile_vendor_tls.py tests/e2e/test_party_deploy.py

test: install
	$(BIN)/python -m pytest -q -ra -m "not slow" $(FAST)

test-all: install
	$(BIN)/python -m pytest -q -ra tests

bench: install
	$(BIN)/python benchmarks/densenet121_infer.py

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

.PHONY: install demo test test-all bench lint
