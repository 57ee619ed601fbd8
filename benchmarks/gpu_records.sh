#!/usr/bin/env bash
# The GPU records of benchmarks/results/: make patch, make doctor, the full parity suite, the fla #640
# before/after demo, the kernel benchmarks and the GPU tests, on whatever GPU this machine has.
# Usage (repo root, packages installed): bash benchmarks/gpu_records.sh KIND [OUTDIR]
#   KIND names the machine in the file names (e.g. h100, h200); OUTDIR defaults to $OUT or benchmarks/results.
set -uo pipefail
kind=${1:?usage: gpu_records.sh KIND [OUTDIR]}
out=${2:-${OUT:-benchmarks/results}}
py=${PY:-python3}
mkdir -p "$out"
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
log="$out/records-$kind.log"
step() { echo "=== $(date -u +%FT%TZ) $*" | tee -a "$log"; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; echo "--- exit $rc after $((SECONDS - t0)) s: $*"; return $rc; }
# make TARGET, or the command the Makefile runs for it where make is missing
mk() {
  if command -v make >/dev/null; then make "$1" PY="$py"; return; fi
  case $1 in patch) "$py" -m qnext.patches apply ;; doctor) PYTHONPATH="$PWD/src:${PYTHONPATH:-}" "$py" -m qnext.doctor ;; esac
}

step "nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
step "make patch (applies matching patches, runs the GDN parity that enables the Hopper fix)"
timed mk patch 2>&1 | tee -a "$log"
step "make doctor"
timed mk doctor 2>&1 | tee "$out/doctor-$kind.txt" | tee -a "$log" | tail -3
step "kernel benchmarks"
timed "$py" benchmarks/kernel_suites.py --out "$out" 2>&1 | grep -v '^{' | tee -a "$log" | tail -40
step "full parity suite"
timed "$py" -m qnext.kernels --suite full --json "$out/parity-full-$kind.json" --md "$out/parity-full-$kind.md" 2>&1 \
  | tee -a "$log" | grep -E 'FAIL|parity suite|exit' | tail -20
step "fla #640 demo: original dS^T code vs patched, every dqkwg autotune config"
timed "$py" -m qnext.kernels --suite bug640 --md "$out/bug640-$kind.md" 2>&1 | tee -a "$log" | tail -5
if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.get_device_capability(0)[0] == 9 else 1)'; then
  step "Blackwell wy_fast patch forced on Hopper (compiles + parity; QNEXT_FLA_WY_OPAQUE_DOT=1)"
  "$py" -m qnext.patches apply --only fla-blackwell-wy-fast --ignore-rules --no-verify 2>&1 | tee -a "$log"
  QNEXT_FLA_WY_OPAQUE_DOT=1 timed "$py" -m qnext.kernels --suite gdn-fast 2>&1 | tee -a "$log" | tail -5
  "$py" -m qnext.patches revert --only fla-blackwell-wy-fast 2>&1 | tee -a "$log"
fi
step "GPU tests of the kernel checks"
timed "$py" -m pytest -q -m gpu tests/gpu/test_kernel_parity_gpu.py 2>&1 | tee -a "$log" | tail -5
step "done"
