# Set-up and the main jobs. Torch is installed first with an explicit version: an open range
# can pull a multi-gigabyte CUDA build. GPU users: make demo TORCH="torch==2.13.0 --index-url <CUDA wheel index>".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean reproduce reproduce-fast

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

# Training steps/s against a plain PyTorch loop, the K = 82 sweep against commit 8f82718 (a git
# worktree of it), evaluation against the authors' dense protocol, and whole experiments (fit + test)
# against the authors' scripts (docs/performance.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/sweep_baseline.py
	$(BIN)/python benchmarks/evaluation.py
	$(BIN)/python benchmarks/experiments.py

# Every configs/experiments/*.yaml as one run each (trained models and baselines), then the report:
# full paper settings -> docs/report-full.md; FAST=1 (or reproduce-fast): short schedules -> docs/report.md.
# By default one experiment per CPU core, each on one torch thread (REPRODUCE_FLAGS overrides it).
REPRODUCE_FLAGS ?= --jobs $(shell nproc) --threads 1
reproduce: $(STAMP)
	$(BIN)/cis reproduce $(if $(FAST),--fast) --output docs/report$(if $(FAST),,-full).md $(REPRODUCE_FLAGS)

reproduce-fast: $(STAMP)
	$(MAKE) reproduce FAST=1

lint: $(STAMP)
	$(BIN)/ruff check cis_lightning tests benchmarks
	$(BIN)/ruff format --check cis_lightning tests benchmarks

clean:
	rm -rf $(VENV) runs
