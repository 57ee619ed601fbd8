#!/usr/bin/env bash
# Megatron backend on one node: torchrun with NPROC processes (default 8, one per GPU).
#   bash scripts/run-8gpu.sh recipe=qwen3_next_80b_lora model.megatron_checkpoint=<make convert OUT> data.path=chats.jsonl
# Environment: NPROC (default 8), TORCHRUN_ARGS (extra torchrun flags), QNEXT_SKIP_DOCTOR=1 (skip the
# doctor's kernel check), QNEXT_DOCTOR_ARGS (default --no-nccl), QNEXT_DRY_RUN=1 (print the commands,
# run nothing), PY (default: the repository's .venv/bin/python).
# The checks, the doctor and the torchrun command are qnext.launch; the run is qnext.megatron.train.
set -euo pipefail
source "$(dirname "$0")/megatron-env.sh"
exec "$PY" -m qnext.launch single "$@"
