#!/usr/bin/env python
"""HF <-> Megatron logits parity for Qwen3-Next: the converted torch_dist checkpoint, loaded into the
Megatron model at any TP/EP/ETP/PP layout, against HF transformers' Qwen3NextForCausalLM on the same
tokens, in float32 and bf16.

Steps (rank 0 prepares, every rank runs the Megatron model, one rank runs HF and writes the JSON):
1. the tiny HF checkpoint (``--hf-ckpt``; created when missing: qnext.models.tiny.write_tiny_checkpoint,
   then its norms, dt_bias and A_log moved off their initial values);
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
``--device cpu`` runs the same comparison without a GPU (gloo; megatron's torch GDN path via
``deterministic_mode`` against HF's torch GDN path): slower, float32 is the meaningful check there.
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
    """Write the tiny HF checkpoint (hub layout, no tokenizer) with every norm, ``dt_bias`` and
    ``A_log`` moved off its initial value, so that the zero-centred (1 + w) and the GDN out-norm
    (w - 1 on the Megatron side) conventions are exercised by the logits."""
    from safetensors.torch import load_file, save_file

    from qnext.models.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(out, seed=seed, with_tokenizer=False)
    g = torch.Generator().manual_seed(seed + 1)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith(("norm.weight", "dt_bias", "A_log")):
                tensors[name] = t + 0.1 * torch.randn(t.shape, generator=g).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return "qnext.models.tiny.write_tiny_checkpoint + norms/dt_bias/A_log perturbed (normal, std 0.1)"


def load_hf(path: Path, dtype: torch.dtype, device: str):
    from qnext.models.hf import load_hf_model

    return load_hf_model(path, dtype, device).eval()


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("transformers", "fla-core", "triton"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


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
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    import contextlib

    from megatron.core import parallel_state as ps

    from qnext.megatron.config import ParallelSizes
    from qnext.megatron.manifest import provenance
    from qnext.megatron.model import build_model, load_torch_dist
    from qnext.megatron.parallel import (
        CPU_BUILD_OVERRIDES, construction_device, destroy_parallel, initialize_parallel,
    )
    from qnext.megatron.parallel import use_torch_gdn_path
    from qnext.megatron.parity import compare, fixed_tokens, megatron_logits

    parallel = ParallelSizes(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    cpu = args.device == "cpu"
    initialize_parallel(parallel, seed=args.seed, backend="gloo" if cpu else None)
    # On CPU megatron's GDN runs its torch path (deterministic_mode: F.conv1d + torch chunked rule).
    overrides = dict(CPU_BUILD_OVERRIDES, deterministic_mode=True) if cpu else None
    if cpu:
        use_torch_gdn_path()
    on_device = (lambda: construction_device("cpu")) if cpu else contextlib.nullcontext
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
    made_list = [made]
    torch.distributed.broadcast_object_list(made_list, src=0)  # the reporting rank may be another one
    made = made_list[0]

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
        with on_device():
            model = build_model(hf_dir, parallel, DTYPES[name], use_te, config_overrides=overrides)
        backend = model.qnext_backend
        load_info[name] = {k: len(v) for k, v in load_torch_dist(model, mg_dir).items()}
        with on_device():
            out = megatron_logits(model, tokens, device=args.device)
        if reporter:
            logits[name] = out.cpu()
        del model, out
        gc.collect()
        if not cpu:
            torch.cuda.empty_cache()

    failed = False
    if reporter:
        ref = {}
        for name in ("fp32", "bf16"):
            hf = load_hf(hf_dir, DTYPES[name], args.device)
            with torch.no_grad():
                ref[name] = hf(tokens.to(args.device)).logits.float().cpu()
            del hf
            if not cpu:
                torch.cuda.empty_cache()
        hf_bf16_err = compare(ref["bf16"], ref["fp32"])
        results = {"hf_bf16_vs_hf_fp32": hf_bf16_err}
        checks = {}
        for name, lg in logits.items():
            results[f"megatron_{name}_vs_hf_fp32"] = compare(lg, ref["fp32"])
            results[f"megatron_{name}_vs_hf_{name}"] = compare(lg, ref[name])
            err = results[f"megatron_{name}_vs_hf_fp32"]["rel_l2"]
            limit = 5e-3 if name == "fp32" else max(2 * hf_bf16_err["rel_l2"], 3e-2)
            checks[name] = {"rel_l2_vs_hf_fp32": err, "limit": limit, "ok": err <= limit and results[f"megatron_{name}_vs_hf_fp32"]["finite"]}
        failed = not all(c["ok"] for c in checks.values())
        command = f"torchrun --nproc-per-node {torch.distributed.get_world_size()} " + " ".join(sys.argv)
        record = {
            "device": args.device,
            "layout": {"tp": args.tp, "ep": args.ep, "etp": args.etp, "pp": args.pp,
                       "world_size": torch.distributed.get_world_size()},
            "backend": backend,
            "tokens": {"batch": args.batch, "seq_len": args.seq_len, "seed": args.seed},
            "hf_ckpt": str(hf_dir), "megatron_ckpt": str(mg_dir), "made": made,
            "load": load_info, "checks": checks, "ok": not failed, "errors": results,
            "provenance": provenance(command, gpus=torch.cuda.device_count(), **_versions()),
        }
        path = out_dir / f"parity_tp{args.tp}_ep{args.ep}_etp{args.etp}_pp{args.pp}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({"checks": checks, "ok": not failed, "json": str(path)}, indent=1))
    flag = torch.tensor([1 if failed else 0], device=args.device)
    torch.distributed.all_reduce(flag)
    destroy_parallel()
    return 1 if int(flag.item()) else 0


if __name__ == "__main__":
    sys.exit(main())
