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
PROFILE ?= local
POSTGRES_PORT ?= 5433
DASK_PORT ?= 8786
SERVERS := $(BIN)/python -m flows.servers --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT) \
	--profile $(PROFILE) --postgres-port $(POSTGRES_PORT) --dask-port $(DASK_PORT)
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export TF_CPP_MIN_LOG_LEVEL := 2
# dvc.yaml's commands run `python`: make it the project's.
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install run flow smoke test lint docs format ui up postgres-server down status serve review monitor shadow bench bench-serve bench-wrk bench-time bench-augment bench-adversarial bench-evaluate bench-scale bench-numbers clean-smoke push pull

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
	$(BIN)/python -m pytest -q --durations=25 --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

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

up: $(STAMP) ## Prefect (:$(PREFECT_PORT)) and MLflow (:$(MLFLOW_PORT)) servers and the deployments; PROFILE=team: the team's servers (docs/team.md)
	@if [[ "$(PROFILE)" == team ]]; then $(MAKE) --no-print-directory postgres-server; fi
	$(SERVERS) up

postgres-server: ## install Debian's PostgreSQL server if it is missing (the team profile needs it)
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && [[ -z "$${PG_BIN:-}" ]]; then \
		if [[ "$$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then \
			echo "installing Debian's postgresql (apt)"; \
			apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; \
		else echo "PostgreSQL is missing: sudo apt-get install postgresql (or set PG_BIN)"; exit 1; fi; \
	fi

down: ## stop what `make up` started (its supervisord in .run/ too), waiting for each to exit; the data stays (PROFILE=team: the team's)
	$(SERVERS) down

status: ## each process of `make up`: its state, pid and uptime, and does it answer?
	$(SERVERS) status

serve: $(STAMP) ## REST API + drawing page for models:/mnist-classifier@champion on http://127.0.0.1:$${PORT:-8000}
	$(BIN)/python -m serving.app

review: $(STAMP) ## list the corrections waiting for review (then: python -m pipelines.review accept|reject IDS)
	$(BIN)/python -m pipelines.review

monitor: $(STAMP) ## one drift check now: the inference log's last window against the training data
	$(BIN)/python -m flows.monitoring

shadow: $(STAMP) ## the shadow gate now: a challenger that agreed on enough served requests takes champion
	$(BIN)/python -m pipelines.shadow

clean-smoke: ## remove the smoke run's scratch copy
	rm -rf .smoke

bench: $(STAMP) ## benchmarks: training throughput vs the seed recipe, then the server under load (needs `make run`)
	$(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.serve_load

bench-serve: $(STAMP) ## benchmark: the REST server under load vs a constant FastAPI endpoint, and the monitoring's cost
	$(BIN)/python -m benchmarks.serve_load --monitoring

bench-wrk: $(STAMP) ## benchmark: the server under wrk vs a constant endpoint on uvloop+httptools and vs mlflow models serve (needs `make run`)
	@if ! command -v wrk >/dev/null 2>&1; then \
		if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's wrk (apt)"; \
			apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null; \
		else echo "wrk is missing: sudo apt-get install wrk"; exit 1; fi; \
	fi
	$(BIN)/python -m benchmarks.serve_wrk

bench-time: $(STAMP) ## benchmark: wall time to the seed recipe's final accuracy, full data (~30 min)
	$(BIN)/python -m benchmarks.time_to_accuracy

bench-augment: $(STAMP) ## benchmark: augmentation on the fly vs precomputed
	$(BIN)/python -m benchmarks.augment_modes

bench-adversarial: $(STAMP) ## benchmark: adversarial training vs plain, same budget, clean and FGSM accuracy (~35 min)
	$(BIN)/python -m benchmarks.adversarial

bench-evaluate: $(STAMP) ## benchmark: evaluate's time with and without insight (the 20% bar; needs `make run`)
	$(BIN)/python -m benchmarks.evaluate_cost

bench-numbers: $(STAMP) ## benchmark: whole numbers read by the segmentation vs cut where drawn, and ms per 5-digit number (needs `make run`)
	$(BIN)/python -m benchmarks.numbers

bench-scale: $(STAMP) ## benchmark: trials/h in process vs on 2 Dask workers; PostgreSQL vs sqlite; MLflow server vs local (~15 min)
	$(BIN)/python -m benchmarks.scale

# push and pull: the remote is REMOTE, else DVC's default (`team`, see docs/operations.md).
SET_REMOTE = remote=$(or $(REMOTE),$$($(BIN)/dvc remote default)) || { echo "$$remote: set REMOTE=<name>" >&2; exit 1; }

# `dvc push` only warns about an output this checkout has no copy of: the check after it fails.
push: $(STAMP) ## push what dvc.lock records (data, model, exports) to the DVC remote (REMOTE=name: another)
	@$(SET_REMOTE); echo "dvc push to remote '$$remote': $$($(BIN)/dvc config remote.$$remote.url)" \
		&& $(BIN)/dvc push --remote "$$remote" \
		&& $(BIN)/dvc data status --not-in-remote --remote "$$remote" --json | $(BIN)/python -c \
		'import json, sys; left = json.load(sys.stdin).get("not_in_remote"); sys.exit(left and f"not on the remote, and not in this checkout to push (make run, or dvc pull them): {left}" or 0)'

pull: $(STAMP) ## fetch and check out from the DVC remote what dvc.lock records (REMOTE=name: another)
	@$(SET_REMOTE); echo "dvc pull from remote '$$remote': $$($(BIN)/dvc config remote.$$remote.url)" \
		&& $(BIN)/dvc pull --remote "$$remote"
