# flexfeed: the two commands are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-setup
CONFIG ?= configs/demo/base.yaml
# One torch thread per process: the machines this runs on have two cores and
# oversubscription costs an order of magnitude.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup test demo bench bench-peer lint stages clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so that nothing below can pull another build
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m demo

bench: $(STAMP)
	$(BIN)/python bench/_suite.py

# flexfeed against DataFlex 1.1.0 on DataFlex's less example; DataFlex is installed once into its own venv
# (bench_out/peer/venv), never into $(VENV). Not part of `bench`. PEER_ARGS: options of bench/peer/run.py.
bench-peer: $(STAMP)
	PYTHON=$(PYTHON) TORCH="$(TORCH)" bash bench/peer/install.sh bench_out/peer
	$(BIN)/python bench/peer/run.py $(PEER_ARGS)

stages: $(STAMP)
	$(BIN)/flexfeed stage all $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check pipeline stages store tests bench demo

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
