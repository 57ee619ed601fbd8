#!/usr/bin/env bash
# FSDP backend launcher: HF checkpoint + PEFT LoRA (or full training), FSDP2 over NCCL (GPU) or gloo (CPU).
#   bash scripts/run-fsdp.sh recipe=tiny_lora_cpu model.checkpoint=runs/tiny-hf train.steps=20
#   NPROC=8 bash scripts/run-fsdp.sh parallel=fsdp model.checkpoint=/ckpt/Qwen3-Next-80B-A3B-Instruct data.path=chats.jsonl
# NPROC (default 1) processes on this node via torchrun; extra torchrun flags (multi-node rendezvous) in
# TORCHRUN_ARGS. Everything else -- defaults, validation, the loop -- lives in qnext.fsdp.train.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}  # keep fla's autotune results on disk: later launches skip the tuning
NPROC=${NPROC:-1}
if [ "$NPROC" = "1" ] && [ -z "${TORCHRUN_ARGS:-}" ]; then
  exec "$PY" -m qnext.fsdp.train "$@"
fi
# one clear message before any process starts (inside torchrun every rank would print it, then
# torchrun its own failure report); with TORCHRUN_ARGS (several nodes) the ranks validate themselves
if [ -z "${TORCHRUN_ARGS:-}" ]; then
  "$PY" -m qnext.config validate "$@" --world-size "$NPROC" >/dev/null || exit $?
fi
# OMP threads per process: the CPU cores shared out (torchrun would default to 1)
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS=$(( cores / NPROC > 0 ? cores / NPROC : 1 ))
fi
exec "$PY" -m torch.distributed.run --nproc-per-node "$NPROC" ${TORCHRUN_ARGS:-} -m qnext.fsdp.train "$@"
