#!/usr/bin/env bash
# Megatron backend on several nodes: run this on every node; torchrun's c10d rendezvous joins them.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#     bash scripts/run-multinode.sh recipe=qwen3_next_80b_full model.megatron_checkpoint=<make convert OUT> data.path=chats.jsonl
# Required: NNODES, NODE_RANK (0 .. NNODES-1), MASTER_ADDR (node 0), MASTER_PORT. Optional: NPROC (processes
# per node, default 8), RDZV_ID (default qnext), TORCHRUN_ARGS, QNEXT_SKIP_DOCTOR=1, QNEXT_DOCTOR_ARGS,
# QNEXT_DRY_RUN=1, PY. output_dir and the checkpoints must be on a file system every node sees.
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
exec "$PY" -m qnext.launch multi "$@"
