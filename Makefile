# The two commands a new user runs (see README): `make demo` and `make test`.
# Both build their own virtual environment in .venv from pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: demo test lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/msit demo --out $(DEMO_DIR)

test: $(VENV)/.installed
	@command -v redis-server >/dev/null || { echo "make test: redis-server is missing (the history store tests run against a real Redis): apt-get install redis-server"; exit 1; }
	$(BIN)/ruff check msit tests benchmarks train tune serve
	$(BIN)/python -m pytest -q tests

lint: $(VENV)/.installed
	$(BIN)/ruff check msit tests benchmarks train tune serve

clean:
	rm -rf $(VENV) runs
