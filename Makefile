# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# One pytest-xdist worker more than the CPUs (at most 4): the end-to-end tests wait on child
# processes and servers much of the time, so one worker more keeps the CPUs busy.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); print(min(4, n + 1))")

# dvc.yaml stage commands call `lmeraser`; keep the venv first on PATH for every recipe.
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: install demo test lint format repro reproduce bench-digits bench-fashion bench-unlearn-digits bench-unlearn-fashion bench-influence-digits bench-influence-fashion bench-backbones lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock > $(VENV)/pip.log 2>&1 \
	  || { grep -v "^WARNING: Location" $(VENV)/pip.log; exit 1; }
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . > $(VENV)/pip-self.log 2>&1 \
	  || { grep -v "^WARNING: Location" $(VENV)/pip-self.log; exit 1; }
	$(BIN)/python -c "import lmeraser, timm, faiss, prefect, mlflow, great_expectations, dvc"
	touch $(STAMP)

install: $(STAMP)

demo: install
	lmeraser data init
	dvc repro
	lmeraser metrics

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

repro: install
	dvc repro

# CI: the demo rebuilt from scratch must give the committed dvc.lock and metrics.json, byte for byte.
reproduce: install
	.ci/reproduce

bench-digits: install
	$(BIN)/python bench/pipeline.py --source digits

bench-fashion: install
	$(BIN)/python bench/pipeline.py --source fashion-mnist

bench-unlearn-digits: install
	$(BIN)/python bench/unlearn.py --source digits

bench-unlearn-fashion: install
	$(BIN)/python bench/unlearn.py --source fashion-mnist

bench-influence-digits: install
	$(BIN)/python bench/influence.py --source digits

bench-influence-fashion: install
	$(BIN)/python bench/influence.py --source fashion-mnist --requests 2

bench-backbones: install
	$(BIN)/python bench/backbones.py --dask

lock: install
	$(BIN)/python -m pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf data artifacts reports metrics.json mlflow.db mlartifacts mlruns
