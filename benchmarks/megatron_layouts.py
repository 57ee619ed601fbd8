#!/usr/bin/env python
"""Layout invariance of the Megatron training entry: the loss and gradient norm of the same first
global batch at every layout the visible GPUs allow, through the real launcher (scripts/run-8gpu.sh).

Models: the tiny Qwen3-Next (full training: every weight's gradient is in the norm) and a proxy with
the real widths (hidden 2048, 512 experts, real head counts, ``--proxy-layers`` layers; LoRA, so its
weights + activations fit one GPU; the norm covers the adapters' gradients, which need the whole
backward). Both are random HF checkpoints converted with ``make convert``'s code.

Layouts: 1 GPU; with 2 GPUs also TP2, EP2, PP2 and TP2 + EP2 (experts folded: ETP1, so the 2 ranks are
TP for attention/GDN and EP for the experts). With 4 GPUs, TP2 x EP2 with ETP2 as well.

Step 1's loss and grad norm are taken before any update, so the learning rate does not matter; the
global batch (8 sequences) and the data order are the same at every layout. Writes
``<out>/layouts.json`` and ``<out>/layouts.md`` (relative difference to the 1-GPU run).

  python benchmarks/megatron_layouts.py --out benchmarks/results/megatron_layouts      (GPUs)
  python benchmarks/megatron_layouts.py --out /tmp/l --skip-proxy --dry-run            (print the commands)
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

# name, processes, parallel overrides
LAYOUTS = [
    ("1 GPU", 1, []),
    ("TP2", 2, ["parallel.tp=2"]),
    ("EP2", 2, ["parallel.ep=2"]),
    ("PP2", 2, ["parallel.pp=2"]),
    ("TP2+EP2 (ETP1)", 2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
    ("TP2xEP2 (ETP2)", 4, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=2"]),
]
BF16_TOLERANCE = 2e-2  # relative; bf16 reductions in a different order per layout


def make_checkpoints(work: Path, proxy_layers: int, skip_proxy: bool) -> dict[str, dict]:
    from qnext.convert import convert_hf_to_torch_dist
    from qnext.models.tiny import write_tiny_checkpoint

    models = {}
    tiny_hf, tiny_mg = work / "tiny_hf", work / "tiny_mg"
    if not (tiny_mg / "latest_checkpointed_iteration.txt").exists():
        write_tiny_checkpoint(tiny_hf, seed=0, overwrite=True)
        convert_hf_to_torch_dist(tiny_hf, tiny_mg, progress=False, log=None, overwrite=True)
    models["tiny (full training)"] = {"overrides": ["model=tiny_qwen3_next", "train=full", f"model.megatron_checkpoint={tiny_mg}"]}
    if not skip_proxy:
        proxy_hf, proxy_mg = work / "proxy_hf", work / "proxy_mg"
        if not (proxy_mg / "latest_checkpointed_iteration.txt").exists():
            t0 = time.time()
            write_tiny_checkpoint(proxy_hf, config_path=REPO / "models/qwen3_next_80b_a3b/config.json", seed=0,
                                  dtype="bfloat16", max_shard_bytes=4 * 2**30, overwrite=True, max_total_bytes=None,
                                  overrides={"num_hidden_layers": proxy_layers})
            convert_hf_to_torch_dist(proxy_hf, proxy_mg, progress=False, log=None, overwrite=True)
            print(f"proxy checkpoint written and converted in {time.time() - t0:.0f}s", flush=True)
        models[f"proxy {proxy_layers} layers, real widths (LoRA)"] = {
            "overrides": [f"model.hf_config={proxy_hf / 'config.json'}", "train=lora", f"model.megatron_checkpoint={proxy_mg}"]}
    return models


def run_layout(out: Path, nproc: int, overrides: list[str], dry_run: bool) -> dict:
    env = dict(os.environ, NPROC=str(nproc), QNEXT_SKIP_DOCTOR="1", PY=sys.executable, PYTHONUNBUFFERED="1",
               NCCL_NVLS_ENABLE="0")
    cmd = ["bash", str(REPO / "scripts/run-8gpu.sh"), "parallel=1gpu", *overrides, f"parallel.num_gpus_per_node={nproc}",
           "data=sample", f"output_dir={out}", "overwrite=true", "train.steps=2", "train.warmup_steps=1",
           "train.global_batch_size=8", "train.micro_batch_size=1", "train.save_every=0", "train.eval_batches=1"]
    print("$ NPROC=%d %s" % (nproc, " ".join(cmd[1:])), flush=True)
    if dry_run:
        return {}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
        print(tail, flush=True)
        return {"error": f"exit {proc.returncode}", "wall_s": round(wall, 1)}
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = next(r for r in recs if r.get("step") == 1 and "loss" in r)
    return {"loss": first["loss"], "grad_norm": first["grad_norm"], "peak_mem_gib": first.get("peak_mem_gib"),
            "wall_s": round(wall, 1)}


def markdown(results: dict, env: dict) -> str:
    lines = [f"# Megatron layout invariance, step-1 loss and grad norm ({env['date']}, {env['gpu']} x{env['gpus']})", "",
             f"Command: `{env['command']}`; tolerance: relative difference <= {BF16_TOLERANCE:g} (bf16).", ""]
    for model, rows in results.items():
        ref = rows.get("1 GPU", {})
        lines += [f"## {model}", "", "| layout | loss | rel diff | grad norm | rel diff | peak GiB/GPU | ok |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, r in rows.items():
            if "loss" not in r:
                lines.append(f"| {name} | — | | — | | | {r.get('error', 'not run')} |")
                continue
            dl = abs(r["loss"] - ref["loss"]) / abs(ref["loss"]) if "loss" in ref else float("nan")
            dg = abs(r["grad_norm"] - ref["grad_norm"]) / abs(ref["grad_norm"]) if "grad_norm" in ref else float("nan")
            ok = dl <= BF16_TOLERANCE and dg <= BF16_TOLERANCE
            lines.append(f"| {name} | {r['loss']:.5f} | {dl:.1e} | {r['grad_norm']:.4f} | {dg:.1e} | "
                         f"{r.get('peak_mem_gib') or 0:.1f} | {'yes' if ok else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qnext_layouts"), help="checkpoints and runs (large)")
    ap.add_argument("--proxy-layers", type=int, default=4)
    ap.add_argument("--skip-proxy", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the launcher commands only")
    args = ap.parse_args()
    import torch

    ngpu = torch.cuda.device_count()
    if ngpu == 0 and not args.dry_run:
        print("megatron_layouts needs CUDA GPUs (megatron.training cannot step on a CPU); --dry-run prints the commands")
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    models = ({"tiny (full training)": {"overrides": ["model=tiny_qwen3_next", "train=full", "model.megatron_checkpoint=<tiny>"]}}
              if args.dry_run else make_checkpoints(args.work, args.proxy_layers, args.skip_proxy))
    results: dict = {}
    env = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0) if ngpu else "none", "gpus": ngpu,
           "command": "python benchmarks/megatron_layouts.py " + " ".join(sys.argv[1:])}
    for model, spec in models.items():
        results[model] = {}
        for name, nproc, par in LAYOUTS:
            if nproc > max(ngpu, 1) and not args.dry_run:
                continue
            slug = f"{len(results)}_{name.split()[0].replace('+', '_')}"
            results[model][name] = run_layout(args.work / "runs" / slug, nproc, spec["overrides"] + par, args.dry_run)
            (args.out / "layouts.json").write_text(json.dumps({"environment": env, "results": results}, indent=1))
            (args.out / "layouts.md").write_text(markdown(results, env))
    if args.dry_run:
        return 0
    print(markdown(results, env))
    ok = all("loss" in r for rows in results.values() for r in rows.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
