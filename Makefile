# nano: `make demo` runs the pipeline on the embedded default; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: install test test-slow demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

demo: install
	mkdir -p $(DEMO_DIR)
	$(BIN)/nano info gemma3-270m
	$(BIN)/nano corpus --split heldout --max-chars 60000 --out $(DEMO_DIR)/heldout.txt
	$(BIN)/nano perplexity gemma3-270m --text $(DEMO_DIR)/heldout.txt --window 512
	$(BIN)/nano generate gemma3-270m --prompt "def fibonacci(n):" --max-new-tokens 48 --temperature 0

clean:
	rm -rf $(VENV) runs .pytest_cache
