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

.PHONY: demo
demo: ## tiny Qwen3-Next on CPU: LoRA on the sample chats, generations before/after, export, reload check
	$(PY) -m qnext.demo $(if $(OUT),--out $(OUT)) $(ARGS)

.PHONY: parity
parity: ## HF <-> Megatron logits of the converted tiny checkpoint at TP1/TP2/EP2/PP2 (GPUs, else CPU)
	PY=$(PY) bash benchmarks/gpu_parity.sh $(OUT)

.PHONY: grad-layouts
grad-layouts: ## one training step's loss + every gradient at 1 rank, TP2, EP2, ETP2, PP2, TP2xEP2 (CPU, or the GPUs there are)
	$(PY) benchmarks/grad_layouts.py --out $(or $(OUT),runs/grad_layouts) $(ARGS)

.PHONY: mutants
mutants: ## put each named bug (tests/mutants.py) into a copy of the repo and check the CPU tests catch it [ARGS="--only NAME"]
	$(PY) tests/mutants.py $(ARGS)

.PHONY: test-gpu
test-gpu: ## run the GPU tests (needs CUDA GPUs)
	$(PY) -m pytest -q -m gpu tests

.PHONY: patch
patch: ## apply the patches in patches/ whose rule matches this machine (idempotent; reports each)
	$(PY) -m qnext.patches apply

.PHONY: unpatch
unpatch: ## revert every patch in patches/ to the pinned wheels' files (hash-checked)
	$(PY) -m qnext.patches revert

.PHONY: doctor
doctor: ## versions, known-bad table, fast kernel parity (<60 s), NCCL all-reduce; non-zero exit on failure
	$(PY) -m qnext.doctor $(if $(RECIPE),--recipe $(RECIPE))

.PHONY: bench-kernels
bench-kernels: ## time + parity tables for attention, MoE experts, GDN (GPU); writes benchmarks/results/
	$(PY) benchmarks/kernel_suites.py

.PHONY: convert
convert: ## HF checkpoint -> Megatron torch_dist on CPU: make convert HF=<hf dir> OUT=<dir> [ARGS="--dtype bf16 --format slime --overwrite"]
	@test -n "$(HF)" -a -n "$(OUT)" || { echo 'usage: make convert HF=<hf checkpoint dir> OUT=<output dir> [ARGS="--dtype bf16"]' >&2; exit 2; }
	$(PY) tools/convert_hf_to_torch_dist.py --hf "$(HF)" --out "$(OUT)" $(ARGS)

.PHONY: export
export: ## torch_dist -> HF safetensors (original names/sharding): make export CKPT=<dir> OUT=<dir> [ARGS="--like <hf dir> --format slime"]
	@test -n "$(CKPT)" -a -n "$(OUT)" || { echo 'usage: make export CKPT=<torch_dist checkpoint> OUT=<output dir> [ARGS="--like <original hf dir>"]' >&2; exit 2; }
	$(PY) tools/convert_torch_dist_to_hf.py --ckpt "$(CKPT)" --out "$(OUT)" $(ARGS)

.PHONY: relayout
relayout: ## torch_dist in one layout -> the other, no HF in between: make relayout CKPT=<dir> OUT=<dir> TO=slime|megatron [ARGS="--hf-meta <hf dir>"]
	@test -n "$(CKPT)" -a -n "$(OUT)" -a -n "$(TO)" || { echo 'usage: make relayout CKPT=<torch_dist checkpoint> OUT=<output dir> TO=slime|megatron [ARGS="--hf-meta <hf dir>"]' >&2; exit 2; }
	$(PY) tools/convert_torch_dist_format.py --ckpt "$(CKPT)" --out "$(OUT)" --to "$(TO)" $(ARGS)

.PHONY: model-args
model-args: ## regenerate models/<name>.sh (Megatron-LM) and models/<name>.slime.sh (slime) MODEL_ARGS from models/*/config.json
	$(PY) tools/gen_model_args.py

.PHONY: plan
plan: ## per-GPU memory plan of a Megatron recipe, and layouts that fit: make plan RECIPE=<name> [GPUS=8] [GPU_MEM=80] [ARGS="key=value"]
	@test -n "$(RECIPE)" || { echo 'usage: make plan RECIPE=<recipe name> [GPUS=<gpus in all>] [GPU_MEM=<GiB per GPU>] [ARGS="key=value ..."]' >&2; exit 2; }
	$(PY) tools/plan.py recipe=$(RECIPE) $(ARGS) $(if $(GPUS),--gpus $(GPUS)) --gpu-mem $(or $(GPU_MEM),80)
