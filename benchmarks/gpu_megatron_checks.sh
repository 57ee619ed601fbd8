#!/usr/bin/env bash
# The one-GPU evidence for the Megatron backend, in the order that matters most, each step logged:
#   1. make patch (the fla Hopper fix and the parity check that enables it; ~5 min on a cold machine)
#   2. GPU tests of the training entry: exact resume, packed sequences, LoRA vs HF+PEFT (~4 min)
#   3. the throughput benchmark (Megatron / FSDP / HF pipeline, LoRA and full, one profiled step each;
#      ~12 min, most of it Triton autotuning in the first run)
#   4. packed attention + RoPE variants: their GPU test, then timed side by side (benchmarks/packed_attention.py, ~2 min)
#   5. one training step at every layout the GPUs allow against one GPU (benchmarks/grad_layouts.py;
#      needs 2 GPUs for TP2/EP2/ETP2/PP2 and 4 for TP2xEP2; ~3 min)
#   6. the fast paths (fla-native GDN, compiled norms/SwiGLU: both default) against their references, and the
#      host-sync check of a LoRA and a full step (~4 min, mostly Triton autotuning)
#   7. the LoRA throughput, Megatron with the fast paths next to the HF pipeline and the FSDP backend, 30
#      steps, with a profiled and a sync-checked step (~4 min with a warm cache)
#   8. LoRA of the real Qwen3-Next-80B-A3B config on this one GPU, FP8 then NF4 experts, synthetic weights,
#      two packed rows of 4096 per forward as the one-GPU recipe runs them, 30 steps and a profiled one each
#      (benchmarks/lora_synthetic.py --mbs 2; ~2 + 3 min with a warm cache)
#   9. the 4-layer proxy's LoRA (Megatron entry, real converted weights), 30 steps each with bf16, FP8 and
#      NF4 experts: loss curves and held-out losses side by side (~1 min each with a warm cache)
#  10. the 80B LoRA recipe's per-GPU compute: 48 layers with 64 of the 512 experts (one EP8 rank, balanced
#      routing), bf16 base, synthetic weights, four packed rows of 4096 per forward as qwen3_next_80b_lora_8xh200
#      runs them, 30 steps and a profiled one; the record estimates the all-to-all it leaves out
#      (benchmarks/lora_synthetic.py --experts 64 --mbs 4; ~3 min)
#  11. step 7's Megatron and HF LoRA runs again with the compiled ops off (QNEXT_FUSED=0), to set against
#      step 7: what compiling costs and buys in a host-bound step (~2 min)
#  12. issue 14's side-by-side runs: LoRA with 2 packed rows per micro-batch (all three approaches, 30 steps, a
#      profiled and a sync-checked step), then full training at 16 sequences per step (Megatron and HF; ~5 min)
#  13. the FP8 dequantization's three forms timed (benchmarks/fp8_dequant.py, ~1 min), and the 48-layer, 64-expert
#      emulation at two rows per forward with the compiled ops on and off (~2 min)
#  14. the grouped experts' fused weight-gradient kernel per tile against the unfused path (benchmarks/grouped_wgrad.py,
#      ~1 min), then full training at 16 sequences with QNEXT_GRAD_ACCUM_FUSION=1 next to the HF pipeline (~5 min)
# Usage (repo root): `source benchmarks/device_prep.sh` (wheels, Triton cache, fla patches; a carried parity
# record skips step 1's check), then bash benchmarks/gpu_megatron_checks.sh KIND [OUTDIR]
#   KIND names the machine in the file names (e.g. h200); OUTDIR defaults to benchmarks/results/gpu_checks_KIND.
#   STEPS=2,3 runs a subset (default 1,2,3,4,5,6,7). One lent GPU call is 10 minutes and a fresh machine
#   spends ~5 of them in step 1: run STEPS=1,6 in one call and STEPS=7 in the next, sent at once.
set -uo pipefail
kind=${1:?usage: gpu_megatron_checks.sh KIND [OUTDIR]}
out=${2:-benchmarks/results/gpu_checks_$kind}
py=${PY:-python3}
steps=${STEPS:-1,2,3,4,5,6,7}
mkdir -p "$out"
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# Triton's compiled kernels and autotuning results in the repository (git-ignored .triton/): a later call on
# the same machine reuses them; TRITON_TAR=<file> also packs them at the end (to carry to a fresh machine)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton}
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" QNEXT_STACK_DUMP_S=${QNEXT_STACK_DUMP_S:-120}
want() { [[ ",$steps," == *",$1,"* ]]; }
step() { echo "=== $(date -u +%FT%TZ) $*"; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; echo "--- exit $rc after $((SECONDS - t0)) s: $*"; return $rc; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
if want 1; then
  step "patch"; timed "$py" -m qnext.patches apply 2>&1 | tee "$out/patch.log" | tail -4
fi
if want 2; then
  step "training entry GPU tests"
  timed "$py" -m pytest -q -m gpu tests/gpu/test_megatron_train_gpu.py -s -p no:cacheprovider 2>&1 \
    | tee "$out/train_gpu.log" | grep -E "^step|resume:|stopped after|held-out|rel L2|passed|failed|Error" | tail -40
fi
if want 3; then
  step "throughput (writes $out/throughput)"
  timed "$py" benchmarks/train_throughput.py --out "$out/throughput" --steps 6 --warmup 2 --gbs 2 --timeout 480 \
    --profile 2>&1 | tee "$out/throughput.log" | grep "^\[bench\]"
fi
if want 4; then
  step "packed attention and RoPE variants (GPU test, then writes $out/packed_attention)"
  timed "$py" -m pytest -q -m gpu tests/gpu/test_megatron_model_gpu.py -k packed_attention -s -p no:cacheprovider 2>&1 \
    | tee "$out/packed_attention_test.log" | grep -E "vs loop|passed|failed|Error" | tail -6
  timed "$py" benchmarks/packed_attention.py --out "$out/packed_attention" 2>&1 | tee "$out/packed_attention.log" | tail -8
fi
if want 5; then
  step "layout invariance of one training step (writes $out/grad_layouts)"
  timed "$py" benchmarks/grad_layouts.py --out "$out/grad_layouts" 2>&1 | tee "$out/grad_layouts.log" | tail -12
fi
if want 6; then
  step "fast paths against their references; host syncs of a step"
  timed "$py" -m pytest -q -m gpu tests/gpu/test_megatron_model_gpu.py -k "fast_paths or packed_attention or grad_accum or main_grad or two_packed_rows" -s \
    -p no:cacheprovider 2>&1 | tee "$out/fast_paths_test.log" | grep -E "rel L2|vs loop|passed|failed|Error" | tail -8
  timed "$py" -m pytest -q -m gpu tests/gpu/test_megatron_train_gpu.py -k syncs -s -p no:cacheprovider 2>&1 \
    | tee "$out/syncs_test.log" | grep -E "planned|UNPLANNED|passed|failed" | tail -30
fi
if want 7; then
  step "LoRA throughput with the fast paths (writes $out/throughput_fast)"
  QNEXT_GDN_FLA_NATIVE=1 QNEXT_FUSED=1 timed "$py" benchmarks/train_throughput.py --out "$out/throughput_fast" \
    --only megatron:lora,hf:lora,fsdp:lora --steps 30 --warmup 3 --gbs 2 --timeout 300 --profile --sync-check 2>&1 \
    | tee "$out/throughput_fast.log" | grep "^\[bench\]"
fi
if want 8; then
  for base in fp8 nf4; do
    step "80B LoRA, $base experts, synthetic weights (writes $out/lora_80b_$base)"
    timed "$py" benchmarks/lora_synthetic.py --base-dtype $base --mbs 2 --steps 30 --warmup 3 --profile \
      --out "$out/lora_80b_$base" 2>&1 | tee "$out/lora_80b_$base.log" | grep "^\[synthetic\]" | tail -6
  done
fi
if want 9; then
  for base in bf16 fp8 nf4; do  # one results directory: the JSON keeps a row per base
    step "4-layer proxy LoRA, $base experts (writes $out/throughput_quant)"
    timed "$py" benchmarks/train_throughput.py --out "$out/throughput_quant" --only megatron:lora --base-dtype $base \
      --steps 30 --warmup 3 --gbs 2 --timeout 300 2>&1 | tee "$out/throughput_$base.log" | grep "^\[bench\]"
  done
fi
if want 10; then
  step "80B LoRA per-GPU emulation: 48 layers, 64 experts, bf16 (writes $out/lora_80b_ep8_rank)"
  timed "$py" benchmarks/lora_synthetic.py --layers 48 --experts 64 --base-dtype bf16 --mbs 4 --steps 30 --warmup 3 --profile \
    --out "$out/lora_80b_ep8_rank" 2>&1 | tee "$out/lora_80b_ep8_rank.log" | grep "^\[synthetic\]" | tail -4
fi
if want 11; then
  step "LoRA throughput without the compiled ops (writes $out/throughput_unfused)"
  QNEXT_FUSED=0 timed "$py" benchmarks/train_throughput.py --out "$out/throughput_unfused" --only megatron:lora,hf:lora \
    --steps 30 --warmup 3 --gbs 2 --timeout 300 --profile 2>&1 | tee "$out/throughput_unfused.log" | grep "^\[bench\]"
fi
if want 12; then
  step "LoRA, 2 rows per micro-batch (writes $out/lora_mbs2), then full at --gbs 16 (writes $out/full_gbs16)"
  timed "$py" benchmarks/train_throughput.py --out "$out/lora_mbs2" --only megatron:lora,hf:lora,fsdp:lora --gbs 2 --mbs 2 \
    --steps 30 --warmup 3 --profile --sync-check --timeout 200 2>&1 | tee "$out/lora_mbs2.log" | grep "^\[bench\]"
  timed "$py" benchmarks/train_throughput.py --out "$out/full_gbs16" --only megatron:full,hf:full --gbs 16 --mbs 2 \
    --steps 8 --warmup 3 --timeout 170 2>&1 | tee "$out/full_gbs16.log" | grep "^\[bench\]"
fi
if want 13; then
  step "FP8 dequantization variants (writes $out/fp8_dequant), then 48x64 LoRA with QNEXT_FUSED=1 and 0"
  timed "$py" benchmarks/fp8_dequant.py --out "$out/fp8_dequant" 2>&1 | tee "$out/fp8_dequant.log" | grep "^\[fp8_dequant\]"
  for fused in 1 0; do
    QNEXT_FUSED=$fused timed "$py" benchmarks/lora_synthetic.py --layers 48 --experts 64 --base-dtype bf16 --mbs 2 \
      --steps 15 --warmup 3 --out "$out/ep8_rank_fused$fused" 2>&1 | tee "$out/ep8_rank_fused$fused.log" \
      | grep "^\[synthetic\]" | tail -2
  done
fi
if want 14; then
  step "fused expert wgrad per tile (writes $out/grouped_wgrad), then full at --gbs 16 with it (writes $out/full_gbs16_fused)"
  timed "$py" benchmarks/grouped_wgrad.py --out "$out/grouped_wgrad" 2>&1 | tee "$out/grouped_wgrad.log" | grep "^\[grouped_wgrad\]"
  QNEXT_GRAD_ACCUM_FUSION=1 timed "$py" benchmarks/train_throughput.py --out "$out/full_gbs16_fused" --only megatron:full,hf:full \
    --gbs 16 --mbs 2 --steps 10 --warmup 3 --profile --timeout 170 2>&1 | tee "$out/full_gbs16_fused.log" | grep "^\[bench\]"
fi
if [ -n "${TRITON_TAR:-}" ]; then
  tar czf "$TRITON_TAR" -C "$(dirname "$TRITON_CACHE_DIR")" "$(basename "$TRITON_CACHE_DIR")" && ls -l "$TRITON_TAR"
fi
step "done"
