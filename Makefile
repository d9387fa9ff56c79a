# Quick start: `make train` (smoke run on built-in defaults), `make test` (the whole CPU suite, as CI runs it),
# `make test-fast` (the edit-test loop: the tests not marked slow).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train lint format test test-fast test-main test-xla bench clean

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

# Everything, as CI runs it: ruff, then the two lanes side by side: the main suite (torch 2.13 CPU, gloo FSDP2;
# two xdist workers) on the console, the torch_xla lane (its own venv) in the background, its log printed when
# both are done. Much of either lane waits on processes and timers; together they fill both cores of a small CI
# machine.
test: lint $(STAMP)
	@log=$$(mktemp); \
	$(MAKE) --no-print-directory test-xla > $$log 2>&1 & xla=$$!; \
	$(MAKE) --no-print-directory test-main; main=$$?; \
	wait $$xla; xla=$$?; \
	echo "--- the XLA lane (ran beside the main lane), status $$xla"; cat $$log; rm -f $$log; \
	test $$main -eq 0 && test $$xla -eq 0

# the edit-test loop: the main lane without the tests marked slow (processes, runs of more than a few seconds)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# two xdist workers, each test file on one worker (its module fixtures made once): runs that wait on a process, a
# timer or Slurm leave a core free, which the other worker takes. Files are handed out in collection order
# (--no-loadscope-reorder: xdist would otherwise start the files with most tests first), which conftest.py sorts
# longest first. WORKERS=0 runs the lane in this one process.
WORKERS ?= 2
test-main: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(ARGS)

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
