# Two commands do everything, set-up included:  make demo   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# one ninja (the venv's) for every process, so DeepSpeed's CPU extension is built once, not per PATH
export PATH := $(abspath $(BIN)):$(PATH)

GPU_WHEELS ?= gpu-wheels

.PHONY: demo test test-fast lint install clean gpu-check gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so no dependency can pull a several-GB CUDA build on a CPU machine
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mtp_megatron demo

test: $(STAMP)
	$(BIN)/ruff format --check mtp_megatron tests
	$(BIN)/ruff check mtp_megatron tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra

# the one-process tier (tests/unit): no gloo worlds, no SLURM (about a minute on 2 cores)
test-fast: $(STAMP)
	$(BIN)/ruff format --check mtp_megatron tests
	$(BIN)/ruff check mtp_megatron tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra tests/unit -m "not slow"

# where the package registry is reachable: the wheels (about 21 MiB) a GPU node without
# network needs beside its own torch; copy gpu-wheels/ to the node with the checkout
gpu-wheels: $(STAMP)
	scripts/gpu_wheels.sh $(GPU_WHEELS) $(BIN)/python

# on a GPU node, no network and no venv needed (the node's python3 and torch): at most 9
# minutes in all, a deadline per stage; summary and figures in runs/gpu_check/ (docs/gpus.md)
gpu-check:
	scripts/gpu_check.sh $(GPU_WHEELS) runs/gpu_check

lint: $(STAMP)
	$(BIN)/ruff format --check mtp_megatron tests
	$(BIN)/ruff check mtp_megatron tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache
