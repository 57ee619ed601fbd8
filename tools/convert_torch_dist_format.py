#!/usr/bin/env python
"""A torch_dist checkpoint in one Megatron-side layout -> the other (ours <-> slime's), on CPU,
streaming, without an HF checkpoint in between.

  python tools/convert_torch_dist_format.py --ckpt ckpt/qwen3-next-80b --out ckpt/qwen3-next-80b-slime --to slime
  make relayout CKPT=ckpt/qwen3-next-80b OUT=ckpt/qwen3-next-80b-slime TO=slime
  make relayout CKPT=<slime run save dir> OUT=ckpt/from-slime TO=megatron ARGS="--hf-meta /path/hf"

The source layout is read off the checkpoint's keys (``--from`` states it). The output is a release
checkpoint (weights only) with ``hf/`` beside it; ``--hf-meta`` names the HF config.json + tokenizer
when the source has no ``hf/`` directory (a checkpoint slime wrote).
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
    ap.add_argument("--ckpt", required=True, help="torch_dist checkpoint: the --save/--load root or an iteration dir")
    ap.add_argument("--out", required=True, help="output checkpoint directory (created; must be empty or new)")
    ap.add_argument("--to", required=True, help="target layout: megatron (make convert's default) | slime")
    ap.add_argument("--from", dest="source", default=None, help="layout of CKPT (default: read off its keys)")
    ap.add_argument("--hf-meta", default=None, help="directory with config.json + tokenizer (default: <ckpt>/hf)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output (only once the new one is complete)")
    args = ap.parse_args(argv)
    interrupt_on_sigterm()  # a killed job cleans up its partial output

    from qnext.convert.relayout import relayout_torch_dist

    relayout_torch_dist(args.ckpt, args.out, to=args.to, source_format=args.source, hf_meta=args.hf_meta,
                        overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
