# The two commands of a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install the package with its dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flwr-robust demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

# The property-based fuzzers with many more examples than `make test` runs (minutes).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=deep $(BIN)/pytest -q tests/test_fuzz_inputs.py tests/test_fuzz_rules.py

bench: $(STAMP)
	$(BIN)/python benchmarks/aggregation.py
	$(BIN)/python benchmarks/signing.py
	$(BIN)/python benchmarks/import_time.py

clean:
	rm -rf $(VENV) .demo results .pytest_cache .ruff_cache
