# Quick start: `make train` (smoke run on built-in defaults), `make test` (the whole CPU suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train lint format test test-main test-xla bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# the smoke run, then its curves: <run_dir>/report.png and a short summary (same overrides, same run folder)
train: $(STAMP)
	$(BIN)/lemur-train experiment=smoke $(ARGS)
	$(BIN)/lemur-report experiment=smoke $(ARGS)

# ruff (format and lint, pyproject.toml) first: seconds, and a tree that is not uniform fails here.
lint: $(STAMP)
	$(BIN)/ruff format --check -q src tests bench
	$(BIN)/ruff check -q src tests bench

# rewrite the tree to the format and the fixable lint rules
format: $(STAMP)
	$(BIN)/ruff format -q src tests bench
	$(BIN)/ruff check -q --fix src tests bench

# Two lanes: the main suite (torch 2.13 CPU, gloo FSDP2), then the torch_xla lane in its own venv.
test: lint test-main test-xla

test-main: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-xla: $(STAMP)
	@if [ -f tests/xla/run.sh ]; then bash tests/xla/run.sh; else echo "xla lane: not present"; fi

bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(ARGS)

# the GPU acceptance check (bench/gpu_check.py): under 8 minutes on one H100/H200; ARGS=--dry-run runs it on CPU
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(ARGS)

clean:
	rm -rf outputs .pytest_cache
