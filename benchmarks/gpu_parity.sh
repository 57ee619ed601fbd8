#!/usr/bin/env bash
# HF <-> Megatron logits parity of the converted tiny checkpoint at every layout the visible GPUs allow
# (TP1 on one GPU; TP2, EP2, PP2 and TP2xEP2 on two), one JSON per layout plus a Markdown summary.
# Usage (repo root, packages installed): bash benchmarks/gpu_parity.sh [OUTDIR]
#   OUTDIR defaults to $OUT, else benchmarks/results/parity. Without GPUs it runs the same checks on CPU
#   (gloo, torch GDN path), two processes for the two-rank layouts.
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/parity}}
py=${PY:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONWARNINGS=ignore PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
work=$(mktemp -d /tmp/qnext_parity.XXXXXX)
ngpu=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc=$(( ngpu >= 2 || ngpu == 0 ? 2 : 1 ))
log="$out/parity.log"
rc=0
run() {  # NPROC LAYOUT-ARGS...
  local n=$1; shift
  echo "=== $(date -u +%FT%TZ) torchrun --nproc-per-node $n benchmarks/megatron_hf_parity.py $*" | tee -a "$log"
  local t0=$SECONDS
  "$py" -m torch.distributed.run --nproc-per-node "$n" --master-port $((29500 + RANDOM % 1000)) \
    benchmarks/megatron_hf_parity.py --out-dir "$out" --hf-ckpt "$work/tiny_hf" --megatron-ckpt "$work/tiny_torch_dist" "$@" \
    >>"$log" 2>&1
  local r=$?
  echo "--- exit $r after $((SECONDS - t0)) s" | tee -a "$log"
  [ $r -eq 0 ] || rc=1
}
run 1
if [ "$nproc" -ge 2 ]; then
  run 2 --tp 2
  run 2 --ep 2
  run 2 --pp 2
  run 2 --tp 2 --ep 2
fi
"$py" - "$out" <<'PY' | tee "$out/parity.md"
import json, sys
from pathlib import Path
rows = sorted(Path(sys.argv[1]).glob("parity_tp*.json"))
if rows:
    first = json.loads(rows[0].read_text())["provenance"]
    print(f"HF <-> Megatron logits parity, tiny Qwen3-Next; {first.get('date', '?')}; "
          f"{first.get('gpu') or 'CPU (gloo)'} x{first.get('gpus', 0)}; megatron-core {first.get('megatron_core', '?')}\n")
print("| layout | ranks | backend | fp32 rel L2 | fp32 max rel | bf16 rel L2 (limit) | bf16 max rel | bf16 mean rel | bf16 top-1 | HF bf16 rel L2 | ok |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for p in rows:
    r = json.loads(p.read_text())
    L, e, c = r["layout"], r["errors"], r["checks"]
    f32, b16 = e["megatron_fp32_vs_hf_fp32"], e["megatron_bf16_vs_hf_fp32"]
    name = " ".join(f"{k.upper()}{v}" for k, v in L.items() if k in ("tp", "ep", "etp", "pp") and v > 1) or "TP1"
    print(f"| {name} | {L['world_size']} | {r['backend']} | {f32['rel_l2']:.2e} | {f32['max_rel']:.2e} | "
          f"{b16['rel_l2']:.2e} ({c['bf16']['limit']:.1e}) | {b16['max_rel']:.2e} | {b16['mean_rel']:.2e} | "
          f"{b16['top1_agree']:.3f} | {e['hf_bf16_vs_hf_fp32']['rel_l2']:.2e} | {'yes' if r['ok'] else 'NO'} |")
PY
rm -rf "$work"
exit $rc
