# Set-up and the main jobs. Torch is installed first with an explicit version: an open range
# can pull a multi-gigabyte CUDA build. GPU users: make demo TORCH="torch==2.13.0 --index-url <CUDA wheel index>".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cis_lightning.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

lint: $(STAMP)
	$(BIN)/ruff check cis_lightning tests benchmarks
	$(BIN)/ruff format --check cis_lightning tests benchmarks

clean:
	rm -rf $(VENV) runs
