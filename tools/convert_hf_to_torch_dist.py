#!/usr/bin/env python
"""HF Qwen3-Next safetensors -> Megatron torch_dist checkpoint, on CPU, streaming.

  python tools/convert_hf_to_torch_dist.py --hf /path/Qwen3-Next-80B-A3B-Instruct --out ckpt/qwen3-next-80b
  make convert HF=/path/Qwen3-Next-80B-A3B-Instruct OUT=ckpt/qwen3-next-80b [ARGS="--dtype bf16"]

The output is a Megatron "release" checkpoint: ``--load <out>`` (Megatron-LM, slime) reads it at
any TP/EP/ETP/PP. ``<out>/hf/`` keeps config, tokenizer and the original shard layout for export.
``--format slime`` writes slime's layout instead (what slime's own converter writes; load it with
``models/<name>.slime.sh``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qnext.errors import cli_main, interrupt_on_sigterm  # noqa: E402



@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors + index + config.json)")
    ap.add_argument("--out", required=True, help="output checkpoint directory (created; must be empty or new)")
    ap.add_argument("--dtype", default="keep", help="keep (default: as stored) | bf16 | fp16 | fp32")
    ap.add_argument("--format", default="megatron", dest="fmt",
                    help="megatron (default: megatron-core's native keys, also Megatron-Bridge's) | slime")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output (only once the new one is complete)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    interrupt_on_sigterm()  # a killed job cleans up its partial output

    from qnext.convert import convert_hf_to_torch_dist

    convert_hf_to_torch_dist(args.hf, args.out, dtype=args.dtype, fmt=args.fmt, overwrite=args.overwrite,
                             progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
