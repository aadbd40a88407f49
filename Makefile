# The project's front door. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MLRUNS ?= mlruns
UI_PORT ?= 5000
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
SERVERS := $(BIN)/python -m flows.servers --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export TF_CPP_MIN_LOG_LEVEL := 2
# dvc.yaml's commands run `python`: make it the project's.
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install run flow smoke test lint docs format ui up down status serve bench bench-serve bench-time bench-augment bench-adversarial bench-evaluate clean-smoke

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv if missing and install the project (pinned by constraints.txt)

run: $(STAMP) ## the main job: run the whole pipeline with `dvc repro` (set MNIST_DIR for full data)
	$(BIN)/python -m flows.locked $(BIN)/dvc repro

flow: $(STAMP) ## the same pipeline as the Prefect flow 'mnist-training' (ephemeral API, no server)
	$(BIN)/python -m flows.training

smoke: $(STAMP) ## the whole pipeline on ~2,000 images for 1 epoch, in a scratch copy (.smoke/)
	$(BIN)/python -m flows.scratch --dest .smoke

test: $(STAMP) ## run the test suite, with its coverage floor (a part: PYTEST_ARGS="--no-cov -m e2e")
	$(BIN)/python -m pytest -q --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: $(STAMP) ## build the documentation site into site/ (MkDocs, strict: a broken link fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: $(STAMP) ## the MLflow UI on http://127.0.0.1:$(UI_PORT) (MLRUNS=.smoke/mlruns for the smoke run)
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(UI_PORT) \
		--backend-store-uri sqlite:///$(abspath $(MLRUNS))/mlflow.db \
		--default-artifact-root $(abspath $(MLRUNS))/artifacts

up: $(STAMP) ## Prefect (:$(PREFECT_PORT)) and MLflow (:$(MLFLOW_PORT)) servers and the deployments, in the background
	$(SERVERS) up

down: ## stop what `make up` started (its supervisord in .run/ too), waiting for each to exit; the data stays
	$(SERVERS) down

status: ## each process of `make up`: its state, pid and uptime, and does it answer?
	$(SERVERS) status

serve: $(STAMP) ## REST API + drawing page for models:/mnist-classifier@champion on http://127.0.0.1:$${PORT:-8000}
	$(BIN)/python -m serving.app

clean-smoke: ## remove the smoke run's scratch copy
	rm -rf .smoke

bench: $(STAMP) ## benchmarks: training throughput vs the seed recipe, then the server under load (needs `make run`)
	$(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.serve_load

bench-serve: $(STAMP) ## benchmark: the REST server under load on loopback vs a constant FastAPI endpoint
	$(BIN)/python -m benchmarks.serve_load

bench-time: $(STAMP) ## benchmark: wall time to the seed recipe's final accuracy, full data (~30 min)
	$(BIN)/python -m benchmarks.time_to_accuracy

bench-augment: $(STAMP) ## benchmark: augmentation on the fly vs precomputed
	$(BIN)/python -m benchmarks.augment_modes

bench-adversarial: $(STAMP) ## benchmark: adversarial training vs plain, same budget, clean and FGSM accuracy (~35 min)
	$(BIN)/python -m benchmarks.adversarial

bench-evaluate: $(STAMP) ## benchmark: evaluate's time with and without insight (the 20% bar; needs `make run`)
	$(BIN)/python -m benchmarks.evaluate_cost
