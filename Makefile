# lit_unlearn — every target does its own set-up on a fresh machine.
# Override TORCH_SPEC for a GPU build, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url <cuda index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LINT_TOOLS ?= ruff==0.17.6 mypy==2.4.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv test demo compare tensorboard target bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)  ## create .venv: torch first, then the project with its test extras

test: $(STAMP)  ## run the whole test suite (unit + integration) on CPU
	$(BIN)/python -m pytest -q

demo: $(STAMP)  ## the main job: build or reuse the synthetic target, unlearn it with naive, PCGrad and SAGO (3 seeds each), print the tables
	$(BIN)/python scripts/demo.py

RUNS ?= runs/demo
compare: $(STAMP)  ## compare the runs below RUNS (default runs/demo): tables, pareto.png, the TensorBoard run comparison/
	$(BIN)/python scripts/compare_runs.py $(RUNS)

tensorboard: $(STAMP)  ## TensorBoard on RUNS (default runs/demo): the comparison, HParams, every run's curves
	$(BIN)/tensorboard --logdir $(RUNS)

target: $(STAMP)  ## build (or reuse) the cached synthetic target model
	$(BIN)/lit-unlearn-target

bench: $(STAMP)  ## synthesis and step benchmarks (tables + JSON under bench_results/)
	$(BIN)/python scripts/bench_synthesis.py
	$(BIN)/python scripts/bench_step.py

lint:  $(STAMP) ## ruff check + ruff format --check + mypy (pinned versions; part of CI)
	$(BIN)/python -m pip install --quiet $(LINT_TOOLS)
	$(BIN)/ruff check lit_unlearn tests scripts
	$(BIN)/ruff format --check lit_unlearn tests scripts
	$(BIN)/mypy lit_unlearn scripts

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache
