# The two commands a new user runs (see README): `make demo` and `make test` (`make test-fast`: a quick subset).
# Both build their own virtual environment in .venv from pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: demo test test-fast lint clean

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
	$(BIN)/ruff format --check msit tests benchmarks train tune serve
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

# mypy checks what [tool.mypy] names in pyproject.toml (msit) (about 50 s cold, a few seconds with its cache).
# The quick check while working: lint and the tests that need neither Ray nor Redis (tests/conftest.py marks
# them); --forbid-ray fails any of these that starts Ray after all, in the test process or a subprocess.
test-fast: $(VENV)/.installed
	$(BIN)/ruff check msit tests benchmarks train tune serve
	$(BIN)/ruff format --check msit tests benchmarks train tune serve
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not ray and not redis" --forbid-ray tests

lint: $(VENV)/.installed
	$(BIN)/ruff check msit tests benchmarks train tune serve
	$(BIN)/ruff format --check msit tests benchmarks train tune serve
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs
