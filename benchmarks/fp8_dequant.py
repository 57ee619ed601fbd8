"""The FP8 experts' dequantization, three ways, timed side by side on one device with the same bits checked.

On one H200 the 80B config's FP8 LoRA step spends 30% of its GPU time in this one kernel (192 calls per step,
1.66 TB/s for the 3 bytes each value moves: benchmarks/results/quant_80b_h200_2026-12-04/, section 3). The
variants, at Qwen3-Next-80B-A3B's expert shapes (fc1 [512, 1024, 2048], fc2 [512, 2048, 512]):

- ``eager``: ``qnext.quant.fp8.dequantize_rows`` (two passes, 7 bytes per value);
- ``compiled_dynamic``: ``dequantize_rows_reference`` under ``torch.compile(dynamic=True)``, what training
  ran until the first H200 measurement of this script;
- ``compiled_static``: the same function compiled for each shape (its sizes constants in the kernel), what
  training runs now (``qnext.megatron.fused.fp8_dequantize``: 2.2x the dynamic form's speed on an H200).

    python benchmarks/fp8_dequant.py --out benchmarks/results/fp8_dequant_h200
    python benchmarks/fp8_dequant.py --device cpu --experts 2 --hidden 64 --ffn 32 --out /tmp/fp8_dequant

Writes ``<out>/fp8_dequant.json``: per shape and variant the time (ms, median of ``--iters``), the bandwidth
of 3 bytes per value, and whether its bf16 values equal the eager form's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qnext.errors import UserError, cli_main  # noqa: E402


def variants() -> dict:
    from qnext.megatron.fused import compiled
    from qnext.quant.fp8 import dequantize_rows, dequantize_rows_reference

    return {"eager": dequantize_rows, "compiled_dynamic": compiled(dequantize_rows_reference),
            "compiled_static": compiled(dequantize_rows_reference, dynamic=False)}


def timed(fn, q, scale, iters: int) -> float:
    """Median seconds of ``fn(q, scale, bf16)`` over ``iters`` calls (after one untimed call)."""
    from qnext.metrics import median_seconds

    return median_seconds(lambda: fn(q, scale, torch.bfloat16), iters, q.is_cuda)


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=512, help="one expert's intermediate size (fc1 has 2x: gate and up)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if min(args.experts, args.hidden, args.ffn, args.iters) < 1:
        raise UserError(f"--experts {args.experts} --hidden {args.hidden} --ffn {args.ffn} --iters {args.iters}",
                        hint="every size and --iters must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU visible", hint="run on a GPU machine, or pass --device cpu")

    from qnext.fsutil import atomic_write_text
    from qnext.quant.fp8 import quantize_rows

    device = torch.device(args.device)
    fns = variants()
    rows = []
    for name, shape in (("fc1", (args.experts, 2 * args.ffn, args.hidden)), ("fc2", (args.experts, args.hidden, args.ffn))):
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        q, scale = quantize_rows(w)
        del w
        want = fns["eager"](q, scale, torch.bfloat16)
        for variant, fn in fns.items():
            same = bool(torch.equal(fn(q, scale, torch.bfloat16), want))
            s = timed(fn, q, scale, args.iters)
            rows.append({"weight": name, "shape": list(shape), "variant": variant, "ms": s * 1e3,
                         "tb_per_s": 3 * q.numel() / s / 1e12, "equal_to_eager": same})
            print(f"[fp8_dequant] {name} {tuple(shape)} {variant}: {s * 1e3:.3f} ms, "
                  f"{3 * q.numel() / s / 1e12:.2f} TB/s, same bits: {same}", flush=True)
        del q, scale, want
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "iters": args.iters,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "fp8_dequant.json", json.dumps(result, indent=1) + "\n")
    if not all(r["equal_to_eager"] for r in rows):
        print("[fp8_dequant] a variant's values differ from the eager form's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
