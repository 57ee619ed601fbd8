#!/usr/bin/env python
"""HF <-> Megatron logits parity for Qwen3-Next: the converted torch_dist checkpoint, loaded into the
Megatron model at any TP/EP/ETP/PP layout, against HF transformers' Qwen3NextForCausalLM on the same
tokens, in float32 and bf16.

Steps (rank 0 prepares, every rank runs the Megatron model, one rank runs HF and writes the JSON):
1. the tiny HF checkpoint (``--hf-ckpt``; created when missing: qnext.models.tiny.write_tiny_checkpoint,
   else a seeded random Qwen3NextForCausalLM with its norms moved off their init, save_pretrained);
2. its torch_dist conversion (``--megatron-ckpt``; created when missing with qnext.convert, i.e.
   tools/convert_hf_to_torch_dist.py);
3. Megatron logits (``build_model`` + ``load_torch_dist``, forward-only pipeline schedule);
4. HF logits in float32 and bf16; errors (rel L2, max/mean relative, top-1 agreement) to
   ``<out-dir>/parity_tp{tp}_ep{ep}_etp{etp}_pp{pp}.json``.

  python benchmarks/megatron_hf_parity.py --out-dir benchmarks/results/parity            # 1 GPU
  torchrun --nproc-per-node 2 benchmarks/megatron_hf_parity.py --tp 2 --out-dir ...       # TP2
  torchrun --nproc-per-node 2 benchmarks/megatron_hf_parity.py --ep 2 --out-dir ...       # EP2
  torchrun --nproc-per-node 2 benchmarks/megatron_hf_parity.py --pp 2 --out-dir ...       # PP2
Pass the same --hf-ckpt/--megatron-ckpt to every layout so they all read one conversion.
Exit code 1 when a check fails (thresholds in the JSON).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

TINY_CONFIG = REPO / "models/tiny_qwen3_next/config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_tiny_hf(out: Path, seed: int) -> str:
    """Write the tiny HF checkpoint; returns which writer made it."""
    try:
        from qnext.models.tiny import write_tiny_checkpoint
    except ImportError:
        write_tiny_checkpoint = None
    if write_tiny_checkpoint is not None:
        try:
            write_tiny_checkpoint(out, seed=seed)
        except TypeError:
            write_tiny_checkpoint(out)
        return "qnext.models.tiny.write_tiny_checkpoint"
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**json.loads(TINY_CONFIG.read_text()))).float()
    with torch.no_grad():  # norms off their init, so the (1 + w) and w - 1 conventions are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return "transformers save_pretrained (seeded random init)"


def load_hf(path: Path, dtype: torch.dtype):
    try:
        from qnext.models.hf import load_hf_model
    except ImportError:
        load_hf_model = None
    if load_hf_model is not None:
        return load_hf_model(path, dtype, "cuda").eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("tp", "ep", "etp", "pp"):
        ap.add_argument(f"--{name}", type=int, default=1)
    ap.add_argument("--hf-ckpt", default=None, help="tiny HF checkpoint dir (default: <out-dir>/tiny_hf, created)")
    ap.add_argument("--megatron-ckpt", default=None, help="its torch_dist conversion (default: <out-dir>/tiny_torch_dist, created)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks/results/parity"))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--use-te", choices=("auto", "yes", "no"), default="auto")
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from qnext.megatron.config import ParallelSizes
    from qnext.megatron.manifest import provenance
    from qnext.megatron.model import build_model, load_torch_dist
    from qnext.megatron.parallel import destroy_parallel, initialize_parallel
    from qnext.megatron.parity import compare, fixed_tokens, megatron_logits

    parallel = ParallelSizes(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    initialize_parallel(parallel, seed=args.seed)
    rank = torch.distributed.get_rank()
    out_dir = Path(args.out_dir)
    hf_dir = Path(args.hf_ckpt) if args.hf_ckpt else out_dir / "tiny_hf"
    mg_dir = Path(args.megatron_ckpt) if args.megatron_ckpt else out_dir / "tiny_torch_dist"
    made = {}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (hf_dir / "config.json").is_file():
            made["hf_ckpt"] = make_tiny_hf(hf_dir, args.seed)
        if not (mg_dir / "latest_checkpointed_iteration.txt").is_file():
            from qnext.convert import convert_hf_to_torch_dist

            convert_hf_to_torch_dist(hf_dir, mg_dir, progress=False)
            made["megatron_ckpt"] = "qnext.convert.convert_hf_to_torch_dist"
    torch.distributed.barrier()

    hf_config = json.loads((hf_dir / "config.json").read_text())
    tokens = fixed_tokens(args.batch, args.seq_len, hf_config["vocab_size"], args.seed)
    use_te = {"auto": None, "yes": True, "no": False}[args.use_te]
    # The one rank that compares: last pipeline stage, first TP and DP rank.
    reporter = (
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )
    logits, load_info, backend = {}, {}, None
    for name in args.dtypes.split(","):
        model = build_model(hf_dir, parallel, DTYPES[name], use_te)
        backend = model.qnext_backend
        load_info[name] = {k: len(v) for k, v in load_torch_dist(model, mg_dir).items()}
        out = megatron_logits(model, tokens)
        if reporter:
            logits[name] = out.cpu()
        del model, out
        gc.collect()
        torch.cuda.empty_cache()

    failed = False
    if reporter:
        ref = {}
        for name in ("fp32", "bf16"):
            hf = load_hf(hf_dir, DTYPES[name])
            with torch.no_grad():
                ref[name] = hf(tokens.cuda()).logits.float().cpu()
            del hf
            torch.cuda.empty_cache()
        hf_bf16_err = compare(ref["bf16"], ref["fp32"])
        results = {"hf_bf16_vs_hf_fp32": hf_bf16_err}
        checks = {}
        for name, lg in logits.items():
            results[f"megatron_{name}_vs_hf_fp32"] = compare(lg, ref["fp32"])
            results[f"megatron_{name}_vs_hf_{name}"] = compare(lg, ref[name])
            err = results[f"megatron_{name}_vs_hf_fp32"]["rel_l2"]
            limit = 5e-3 if name == "fp32" else max(2 * hf_bf16_err["rel_l2"], 1e-2)
            checks[name] = {"rel_l2_vs_hf_fp32": err, "limit": limit, "ok": err <= limit and results[f"megatron_{name}_vs_hf_fp32"]["finite"]}
        failed = not all(c["ok"] for c in checks.values())
        command = f"torchrun --nproc-per-node {torch.distributed.get_world_size()} " + " ".join(sys.argv)
        record = {
            "layout": {"tp": args.tp, "ep": args.ep, "etp": args.etp, "pp": args.pp,
                       "world_size": torch.distributed.get_world_size()},
            "backend": backend,
            "tokens": {"batch": args.batch, "seq_len": args.seq_len, "seed": args.seed},
            "hf_ckpt": str(hf_dir), "megatron_ckpt": str(mg_dir), "made": made,
            "load": load_info, "checks": checks, "ok": not failed, "errors": results,
            "provenance": provenance(command),
        }
        path = out_dir / f"parity_tp{args.tp}_ep{args.ep}_etp{args.etp}_pp{args.pp}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({"checks": checks, "ok": not failed, "json": str(path)}, indent=1))
    flag = torch.tensor([1 if failed else 0], device="cuda")
    torch.distributed.all_reduce(flag)
    destroy_parallel()
    return 1 if int(flag.item()) else 0


if __name__ == "__main__":
    sys.exit(main())
