#!/usr/bin/env bash
# Megatron backend on one node: torchrun with NPROC processes (default 8, one per GPU).
#   bash scripts/run-8gpu.sh recipe=qwen3_next_80b_lora model.megatron_checkpoint=<make convert OUT> data.path=chats.jsonl
# Environment: NPROC (default 8), TORCHRUN_ARGS (extra torchrun flags), QNEXT_SKIP_DOCTOR=1 (skip the
# doctor's kernel check), QNEXT_DOCTOR_ARGS (default --no-nccl), QNEXT_DRY_RUN=1 (print the commands,
# run nothing), PY (default: the repository's .venv/bin/python).
# The checks, the doctor and the torchrun command are qnext.launch; the run is qnext.megatron.train.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PY:-$ROOT/.venv/bin/python}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}          # no NVLink multicast (NVLS)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron: ordered TP/SP communication
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}  # keep fla's autotune results on disk: later launches skip the tuning
exec "$PY" -m qnext.launch single "$@"
