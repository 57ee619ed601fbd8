#!/usr/bin/env python
"""Grouped-GEMM experts (qnext) vs megatron's SequentialMLP: time and agreement, one GPU, bf16.

Same weights in both; tokens routed top-k uniformly at random over the experts, as the dispatcher
hands them over (sorted by expert). Times forward and forward+backward with CUDA events (median).

  python benchmarks/grouped_experts.py --experts 512 --hidden 2048 --ffn 512 --tokens 4096 --topk 10 --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def timed(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.experts import GroupedGemmExperts
    from qnext.megatron.manifest import provenance
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    cfg = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text())
    cfg.update(hidden_size=args.hidden, moe_intermediate_size=args.ffn, num_experts=args.experts,
               num_experts_per_tok=args.topk, num_hidden_layers=4)
    tc = hf_to_transformer_config(cfg, None, torch.bfloat16).config
    pgs = get_default_pg_collection()
    seq = SequentialMLP(args.experts, tc, MLPSubmodules(ColumnParallelLinear, RowParallelLinear), pg_collection=pgs)
    grp = GroupedGemmExperts(args.experts, tc, pg_collection=pgs)
    with torch.no_grad():
        for e, mlp in enumerate(seq.local_experts):
            grp.linear_fc1.weight[e].copy_(mlp.linear_fc1.weight)
            grp.linear_fc2.weight[e].copy_(mlp.linear_fc2.weight)

    g = torch.Generator().manual_seed(0)
    choice = torch.rand(args.tokens, args.experts, generator=g).topk(args.topk, dim=-1).indices.flatten()
    counts = torch.bincount(choice, minlength=args.experts)
    rows = int(counts.sum())
    x = torch.randn(rows, args.hidden, generator=g).to(torch.bfloat16).cuda()
    probs = torch.rand(rows, generator=g).cuda()
    gout = torch.randn(rows, args.hidden, generator=g).to(torch.bfloat16).cuda()

    def fwd(mod):
        return lambda: mod(x, counts, probs)[0]

    def fwd_bwd(mod):
        def run():
            xi = x.detach().requires_grad_(True)
            mod(xi, counts, probs)[0].backward(gout)
        return run

    with torch.no_grad():
        y_seq, y_grp = seq(x, counts, probs)[0].float(), grp(x, counts, probs)[0].float()
    agree = float((y_grp - y_seq).norm() / y_seq.norm())
    flops_fwd = 2 * rows * args.hidden * args.ffn * 3
    result = {"rows": rows, "rel_l2_grouped_vs_sequential": agree, "flops_fwd": flops_fwd}
    for name, mod in (("sequential", seq), ("grouped", grp)):
        with torch.no_grad():
            f = timed(fwd(mod), args.reps, 3)
        fb = timed(fwd_bwd(mod), args.reps, 3)
        result[name] = {"fwd_ms": f, "fwd_bwd_ms": fb, "fwd_tflops": flops_fwd / f / 1e9,
                        "fwd_bwd_tflops": 3 * flops_fwd / fb / 1e9}
    result["speedup_fwd"] = result["sequential"]["fwd_ms"] / result["grouped"]["fwd_ms"]
    result["speedup_fwd_bwd"] = result["sequential"]["fwd_bwd_ms"] / result["grouped"]["fwd_bwd_ms"]
    result["provenance"] = provenance("python " + " ".join(sys.argv), **vars(args))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"grouped_experts_e{args.experts}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
