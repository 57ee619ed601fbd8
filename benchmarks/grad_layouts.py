#!/usr/bin/env python
"""One training step's loss and gradients at every TP/EP/ETP/PP layout the machine allows, compared
with the single-rank run tensor by tensor (``qnext.megatron.layout_check`` under torchrun, one world per
layout). On a CPU box every layout runs (gloo, fp32, megatron's torch GDN path); on GPUs those that fit
the visible GPUs, in bf16 by default.

  python benchmarks/grad_layouts.py --out /tmp/grad_layouts                       # tiny model, made here
  python benchmarks/grad_layouts.py --out D --hf H --megatron-ckpt M --dtype bf16  # your checkpoint

Writes ``<out>/<layout>/summary.json`` + ``grads.pt`` per layout and ``<out>/grad_layouts.md`` / ``.json``
(relative differences to the single-rank run). Exit status 1 when a layout differs by more than the
tolerance: fp32 1e-5 for loss and gradient norm, 1e-3 per tensor; bf16 2e-2 for loss and gradient norm,
and per tensor max(2 x that tensor's rounding noise, 5e-2), the noise measured by two more single-rank runs
of the same step, in fp32 and with the row-parallel products rounded as at TP2 (``--split-k 2``): in bf16
the routers and the experts behind them move by tens of percent with rounding alone, and GDN's
A_log/dt_bias gradients are sums that cancel 17-22x. On CPU the runs take megatron's eager path
(its torch.compile of the GDN input preparation miscompiles bf16 there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

LAYOUTS = [  # name, ranks, layout_check arguments
    ("1rank", 1, []),
    ("tp2_sp", 2, ["--tp", "2"]),
    ("ep2", 2, ["--ep", "2"]),
    ("tp2_etp2_sp", 2, ["--tp", "2", "--etp", "2"]),
    ("pp2", 2, ["--pp", "2"]),
    ("tp2_ep2_sp", 4, ["--tp", "2", "--ep", "2"]),
]
TOLERANCE = {"fp32": (1e-5, 1e-5, 1e-3), "bf16": (2e-2, 2e-2, 5e-2)}  # loss, grad norm, worst tensor
NOISE_RUNS = [("1rank_fp32", 1, ["--dtype", "fp32"]), ("1rank_split2", 1, ["--split-k", "2"])]


def make_tiny(out: Path) -> tuple[Path, Path]:
    from qnext.convert import convert_hf_to_torch_dist
    from qnext.models.tiny import write_tiny_checkpoint

    hf, mg = out / "tiny_hf", out / "tiny_torch_dist"
    if not (hf / "config.json").is_file():
        write_tiny_checkpoint(hf, seed=0)
    if not (mg / "latest_checkpointed_iteration.txt").is_file():
        convert_hf_to_torch_dist(hf, mg, progress=False, log=None)
    return hf, mg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hf", type=Path, help="HF checkpoint (default: a tiny random Qwen3-Next written to --out)")
    ap.add_argument("--megatron-ckpt", type=Path, help="its torch_dist conversion (with --hf)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), help="default: fp32 on CPU, bf16 on GPUs")
    ap.add_argument("--only", default="", help="comma-separated layout names, e.g. 1rank,tp2_sp")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per layout")
    ap.add_argument("extra", nargs="*", help="more layout_check arguments after --, e.g. -- --mode lora --seq 256")
    args = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    dtype = args.dtype or ("bf16" if gpus else "fp32")
    if (args.hf is None) != (args.megatron_ckpt is None):
        ap.error("--hf and --megatron-ckpt go together")
    args.out.mkdir(parents=True, exist_ok=True)
    hf, mg = (args.hf, args.megatron_ckpt) if args.hf else make_tiny(args.out)
    wanted = [x for x in args.only.split(",") if x]
    unknown = sorted(set(wanted) - {name for name, _, _ in LAYOUTS})
    if unknown:
        ap.error(f"unknown layout(s) {unknown}; known: {[n for n, _, _ in LAYOUTS]}")
    ran, skipped = [], []
    layouts = list(LAYOUTS)
    if dtype == "bf16":  # the single rank with other valid rounding: each tensor's bf16 rounding noise (its limit)
        layouts[1:1] = NOISE_RUNS
    for name, ranks, extra in layouts:
        if wanted and name not in wanted and not name.startswith("1rank"):
            continue
        if gpus and ranks > gpus:
            skipped.append(f"{name} (needs {ranks} GPUs, {gpus} visible)")
            continue
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        if not gpus:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # every world on the same thread count
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "qnext.megatron.layout_check", "--hf", str(hf), "--megatron-ckpt", str(mg),
               "--out", str(args.out / name), "--device", device, "--dtype", dtype, *args.extra, *extra]
        t0 = time.time()
        print(f"[grad_layouts] {name}: {ranks} rank(s) ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        (args.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"[grad_layouts] {name} failed (exit {proc.returncode}); log: {args.out / f'{name}.log'}\n"
                  + proc.stderr[-3000:], file=sys.stderr)
            return 1
        print(f"[grad_layouts] {name}: done in {time.time() - t0:.0f} s", flush=True)
        ran.append(name)

    from qnext.fsutil import atomic_write_text
    from qnext.megatron.layout_check import compare, markdown

    noise_names = {n for n, _, _ in NOISE_RUNS}
    noise = [args.out / n for n in ran if n in noise_names] or None
    layout_runs = [n for n in ran if n not in noise_names]
    rows = compare([args.out / n for n in layout_runs], noise=noise) if len(layout_runs) > 1 else []
    tol_loss, tol_norm, tol_tensor = TOLERANCE[dtype]
    for r in rows:
        tensors_ok = r["worst_excess"] <= 1.0 if "worst_excess" in r else r["worst_tensor_rel_l2"] <= tol_tensor
        r["ok"] = bool(r["tokens_equal"] and r["loss_rel_diff"] <= tol_loss and r["grad_norm_rel_diff"] <= tol_norm
                       and tensors_ok)
    ref = json.loads((args.out / "1rank" / "summary.json").read_text())
    tensor_rule = (f"max(2 x its largest difference at one rank to the same step in fp32 and with TP2's rounding, "
                   f"{tol_tensor:g})" if noise else f"{tol_tensor:g}")
    head = (f"Model `{hf}` ({ref['mode']}, {dtype}, {device}{f' x{gpus}' if gpus else ''}), {ref['samples']} samples of "
            f"at most {ref['seq']} tokens, {ref['loss_tokens']} labelled; 1 rank: loss {ref['loss']:.6f}, "
            f"grad norm {ref['grad_norm']:.6f} over {ref['tensors']} tensors. Tolerance (relative): loss {tol_loss:g}, "
            f"grad norm {tol_norm:g}, per tensor {tensor_rule}.")
    text = head + "\n\n" + markdown(rows) + "\n" + (f"\nNot run: {', '.join(skipped)}.\n" if skipped else "")
    atomic_write_text(args.out / "grad_layouts.md", text)
    atomic_write_text(args.out / "grad_layouts.json", json.dumps({"reference": ref, "rows": rows, "skipped": skipped,
                                                                 "dtype": dtype, "device": device, "gpus": gpus},
                                                                indent=1) + "\n")
    print(text)
    bad = [r["layout"] for r in rows if not r["ok"]]
    if bad:
        print(f"[grad_layouts] outside the tolerance: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
