# qnext: every user-facing command is a target here; `make help` lists them all.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/src:$(PYTHONPATH)

.PHONY: help
help: ## list every target
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: setup
setup: ## build .venv (Python 3.12) with the pinned dependencies, then apply the matching patches
	@bash scripts/setup.sh "$(VENV)"

.PHONY: test
test: ## run the CPU test suite (what CI runs)
	$(PY) -m pytest -q -m "not gpu" tests

.PHONY: test-gpu
test-gpu: ## run the GPU tests (needs CUDA GPUs)
	$(PY) -m pytest -q -m gpu tests
