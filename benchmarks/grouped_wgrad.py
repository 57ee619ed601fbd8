"""The grouped experts' fused weight-gradient accumulation (``qnext.megatron.grouped_wgrad``) timed per tile
configuration against the unfused path it replaces, on one GPU, each checked against the fp32 reference.

At Qwen3-Next-80B-A3B's expert shapes (fc1 [512, 1024, 2048], fc2 [512, 2048, 512]) and ~160 rows per expert
(the 4-layer proxy's 8,192 tokens per micro-batch, top-10 of 512): per configuration the median time of
``--iters`` calls, the bandwidth of the 8 bytes per ``main_grad`` value it moves, and the relative L2 error
against ``wgrad_accum_reference``; then the unfused path (the bf16 grouped GEMM, then the compiled
``main_grad`` add).

    python benchmarks/grouped_wgrad.py --out benchmarks/results/grouped_wgrad_h200

Needs a CUDA GPU (the kernel is Triton's). Writes ``<out>/grouped_wgrad.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qnext.errors import UserError, cli_main  # noqa: E402

TILES = [(128, 128, 32, 8, 3, False), (128, 128, 32, 8, 3, True), (128, 128, 64, 8, 3, True),
         (64, 128, 32, 4, 3, True), (64, 256, 32, 8, 3, True), (128, 256, 32, 8, 3, True),
         (256, 128, 32, 8, 3, True), (64, 64, 32, 4, 4, True), (32, 64, 32, 4, 4, True), (64, 32, 32, 4, 4, True),
         (64, 64, 64, 4, 3, True), (64, 64, 32, 2, 4, True), (64, 64, 16, 4, 4, True)]


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows-per-expert", type=int, default=160)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.rows_per_expert < 1 or args.iters < 1:
        raise UserError(f"--rows-per-expert {args.rows_per_expert} --iters {args.iters}", hint="both must be at least 1")
    if not torch.cuda.is_available():
        raise UserError("benchmarks/grouped_wgrad.py times a Triton kernel: it needs a CUDA GPU",
                        hint="run it on a GPU machine; the CPU test of the accumulation is tests/unit/test_grouped_wgrad.py")
    from qnext.megatron.compat.main_grad import accumulate
    from qnext.fsutil import atomic_write_text
    from qnext.megatron.grouped_wgrad import TILE, wgrad_accum, wgrad_accum_reference
    from qnext.metrics import median_seconds

    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for name, n, k in (("fc1", 1024, 2048), ("fc2", 2048, 512)):
        counts = torch.randint(0, 2 * args.rows_per_expert + 1, (512,), device="cuda", generator=gen)
        offsets = counts.cumsum(0).to(torch.int32)
        rows = int(offsets[-1])
        x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
        dy = torch.randn(rows, n, device="cuda", generator=gen).bfloat16()
        start = torch.randn(512, n, k, device="cuda", generator=gen)
        want = start.clone()
        wgrad_accum_reference(x, dy, None, offsets, want)
        scale = float((want - start).norm())
        grad = start.clone()
        for tile in TILES:
            got = start.clone()
            wgrad_accum(x, dy, None, offsets, got, tile)
            rel = float((got - want).norm()) / scale
            del got
            s = median_seconds(lambda: wgrad_accum(x, dy, None, offsets, grad, tile), args.iters, cuda=True)
            records.append({"weight": name, "shape": [512, n, k], "rows": rows, "variant": "fused", "tile": list(tile),
                            "default": tile == TILE, "ms": s * 1e3, "tb_s": 8 * grad.numel() / s / 1e12, "rel_l2": rel})
            print(f"[grouped_wgrad] {name} fused {tile}: {s * 1e3:.3f} ms, {records[-1]['tb_s']:.2f} TB/s, "
                  f"rel L2 {rel:.1e}" + (" (default)" if tile == TILE else ""), flush=True)
        s = median_seconds(lambda: accumulate(grad, torch._grouped_mm(dy.t(), x, offs=offsets)), args.iters, cuda=True)
        records.append({"weight": name, "shape": [512, n, k], "rows": rows, "variant": "unfused", "ms": s * 1e3})
        print(f"[grouped_wgrad] {name} unfused (bf16 grouped GEMM + compiled add): {s * 1e3:.3f} ms", flush=True)
        del x, dy, start, want, grad
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "grouped_wgrad.json",
                      json.dumps({"device": torch.cuda.get_device_name(), "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
