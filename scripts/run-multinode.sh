#!/usr/bin/env bash
# Megatron backend on several nodes: run this on every node; torchrun's c10d rendezvous joins them.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#     bash scripts/run-multinode.sh recipe=qwen3_next_80b_full model.megatron_checkpoint=<make convert OUT> data.path=chats.jsonl
# Required: NNODES, NODE_RANK (0 .. NNODES-1), MASTER_ADDR (node 0), MASTER_PORT. Optional: NPROC (processes
# per node, default 8), RDZV_ID (default qnext), TORCHRUN_ARGS, QNEXT_SKIP_DOCTOR=1, QNEXT_DOCTOR_ARGS,
# QNEXT_DRY_RUN=1, PY. output_dir and the checkpoints must be on a file system every node sees.
# The checks, the doctor and the torchrun command are qnext.launch; the run is qnext.megatron.train.
set -euo pipefail
source "$(dirname "$0")/megatron-env.sh"
exec "$PY" -m qnext.launch multi "$@"
