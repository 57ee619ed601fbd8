"""Kernel benchmarks at Qwen3-Next shapes: forward/backward time, peak memory and parity per config.

    python benchmarks/kernel_suites.py [--out benchmarks/results] [--quick]      (make bench-kernels)

Attention (eager, SDPA, flex), MoE experts (sequential loop, grouped GEMM) and Gated DeltaNet (fla's
Triton kernels, this repository's chunked PyTorch form in float32). Times are medians of
``triton.testing.do_bench`` (L2 flushed between runs); the forward is timed with autograd recording
(as in training) and the backward on a retained graph. Parity is the largest relative error over the
outputs and gradients against the float32 reference, next to its threshold (see qnext.kernels).
Writes kernels-<gpu>.json and kernels-<gpu>.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qnext.kernels import attention, gdn, moe  # noqa: E402
from qnext.kernels.__main__ import environment  # noqa: E402
from qnext.kernels.gdn import GDNCase, packed_lengths  # noqa: E402


def _bench(fn, grads_of=()) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads_of), return_mode="median")


def time_fwd_bwd(forward, leaves: list[torch.Tensor], dout: torch.Tensor) -> dict:
    """forward() builds the graph from ``leaves``; returns fwd/bwd medians (ms) and peak memory (GiB).

    The backward is timed on a retained graph where the kernel allows it. torch.compile'd backwards
    (flex attention) donate their buffers and refuse a retained graph: there forward+backward is timed
    as one and the backward is that minus the forward (``bwd_from``: "fwd+bwd - fwd")."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = forward()
    out.backward(dout)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    fwd = _bench(forward)
    out = forward()
    try:
        out.backward(dout, retain_graph=True)
    except RuntimeError as err:
        if "retain_graph" not in str(err):
            raise
        del out
        total = _bench(lambda: forward().backward(dout), leaves)
        return {"fwd_ms": fwd, "bwd_ms": total - fwd, "total_ms": total, "peak_gib": peak, "bwd_from": "fwd+bwd - fwd"}
    bwd = _bench(lambda: out.backward(dout, retain_graph=True), leaves)
    return {"fwd_ms": fwd, "bwd_ms": bwd, "total_ms": fwd + bwd, "peak_gib": peak}


def parity_summary(rows) -> dict:
    out = {}
    for r in rows:
        if r.error is not None:
            out[r.impl] = {"passed": False, "worst": r.error[:120]}
        else:
            q, v, thr = r.worst()
            out[r.impl] = {"passed": r.passed, "worst": f"{q} {v:.1e} (<= {thr:g})"}
    return out


def bench_attention(T: int, cu=None) -> dict:
    case = attention.AttnCase(T, cu_seqlens=cu)
    rows = attention.check_case(case, tuple(attention.IMPLS), torch.device("cuda"))
    x = attention.make_inputs(case, torch.device("cuda"), torch.bfloat16)
    res = {}
    for name, fn in attention.IMPLS.items():
        leaves = [x[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v")]
        try:
            res[name] = time_fwd_bwd(lambda: fn(*leaves, x["doc"]), leaves, x["do"])
        except Exception as err:
            res[name] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
    return {"kernel": "attention", "config": case.name, "timing": res, "parity": parity_summary(rows)}


def bench_moe(tokens: int, experts: int) -> dict:
    case = moe.MoECase(tokens, experts)
    rows = moe.check_case(case, tuple(moe.IMPLS), torch.device("cuda"))
    x = moe.make_inputs(case, torch.device("cuda"), torch.bfloat16)
    res = {}
    for name, fn in moe.IMPLS.items():
        leaves = [x[n].detach().clone().requires_grad_(True) for n in ("x", "probs", "w1", "w2")]
        try:
            res[name] = time_fwd_bwd(lambda: fn(leaves[0], leaves[1], x["idx"], leaves[2], leaves[3]), leaves, x["dout"])
        except Exception as err:
            res[name] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
    return {"kernel": "moe", "config": case.name, "timing": res, "parity": parity_summary(rows)}


def bench_gdn(case: GDNCase) -> dict:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from qnext.kernels.gdn_reference import gdn_chunked

    dev = torch.device("cuda")
    with gdn.fla_checking():
        fla_row, ref = gdn.check_case(case, "fla", dev)
        torch_row, _ = gdn.check_case(case, "torch", dev, ref=ref)
    del ref
    res = {}
    for name, dtype in (("fla", torch.bfloat16), ("torch-chunked-fp32", torch.float32)):
        x = gdn.make_inputs(case, dev, dtype)
        leaves = {n: x[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v", "g", "beta")}
        L = leaves
        if name == "fla":
            def forward():
                return chunk_gated_delta_rule(L["q"], L["k"], L["v"], L["g"], L["beta"], use_qk_l2norm_in_kernel=x["l2norm"],
                                              cu_seqlens=x["cu_seqlens"])[0]
        else:
            def forward():
                return gdn_chunked(L["q"], L["k"], L["v"], L["g"], L["beta"], use_qk_l2norm=x["l2norm"], cu_seqlens=x["cu_seqlens"])
        try:
            with gdn.fla_checking():
                res[name] = time_fwd_bwd(forward, list(leaves.values()), x["do"])
        except Exception as err:
            res[name] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
    fla_row.impl, torch_row.impl = "fla", "torch-chunked-fp32"
    return {"kernel": "gdn", "config": case.name, "timing": res, "parity": parity_summary([fla_row, torch_row])}


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(results: list[dict], env: dict, command: str) -> str:
    lines = [f"# Kernel benchmarks on {env.get('gpu', '?')}", "",
             f"Command: `{command}`  ", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "Median times (ms) of `triton.testing.do_bench`; forward with autograd recording, backward on a retained graph;",
             "peak = extra memory of one forward+backward. Parity: largest relative error vs the float32 reference.",
             "bwd* = (forward+backward) - forward, where the compiled backward refuses a retained graph (flex).", ""]
    for kernel in dict.fromkeys(r["kernel"] for r in results):
        lines += [f"## {kernel}", "", "| config | impl | fwd ms | bwd ms | fwd+bwd ms | peak GiB | parity (worst) | pass |",
                  "|---|---|---:|---:|---:|---:|---|---|"]
        for r in (r for r in results if r["kernel"] == kernel):
            for impl, t in r["timing"].items():
                p = r["parity"].get(impl, {})
                if "error" in t:
                    lines.append(f"| {r['config']} | {impl} | — | — | — | — | {t['error']} | no |")
                    continue
                lines.append(f"| {r['config']} | {impl} | {t['fwd_ms']:.3f} | {t['bwd_ms']:.3f}{'*' if 'bwd_from' in t else ''} | {t['total_ms']:.3f} | "
                             f"{t['peak_gib']:.2f} | {p.get('worst', '')} | {'yes' if p.get('passed') else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--quick", action="store_true", help="one size per kernel")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench-kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    command = "python benchmarks/kernel_suites.py" + (" --quick" if args.quick else "")
    # the one-size configs of every kernel first, then the long/packed ones: results are written after
    # each config, so a run stopped early still leaves a table of what it measured
    jobs = [(bench_attention, (4096, None)), (bench_moe, (4096, 64)), (bench_gdn, (GDNCase(4096),))]
    if not args.quick:
        jobs += [(bench_moe, (4096, 512)), (bench_attention, (8192, None)),
                 (bench_attention, (8192, packed_lengths(8192, 4, seed=5))), (bench_gdn, (GDNCase(8192),)),
                 (bench_gdn, (GDNCase(8192, cu_seqlens=packed_lengths(8192, 6, seed=2)),))]
    env = environment()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu", "gpu")).strip("-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    md_text = ""
    for k, (fn, fn_args) in enumerate(jobs, start=1):
        t0 = time.perf_counter()
        results.append(fn(*fn_args))
        print(json.dumps(results[-1]), flush=True)
        print(f"[kernels] {k}/{len(jobs)} {results[-1]['kernel']} {results[-1]['config']}: "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        doc = {"command": command, "environment": env, "complete": k == len(jobs), "results": results}
        atomic_write(args.out / f"kernels-{slug}.json", json.dumps(doc, indent=1))
        md_text = markdown(results, env, command)
        atomic_write(args.out / f"kernels-{slug}.md", md_text)
    print(md_text)
    ok = all(p.get("passed") for r in results for p in r["parity"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
