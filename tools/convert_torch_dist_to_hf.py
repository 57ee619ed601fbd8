#!/usr/bin/env python
"""Megatron torch_dist checkpoint -> HF Qwen3-Next safetensors (on-disk names), on CPU, streaming.

  python tools/convert_torch_dist_to_hf.py --ckpt ckpt/qwen3-next-80b --out hf-out
  make export CKPT=ckpt/qwen3-next-80b OUT=hf-out [ARGS="--like /path/original"]

Shard names, tensor->file assignment and dtypes follow ``--like <original HF dir>``, else the layout
recorded at convert time (``<ckpt>/hf/layout.json``), else size-based shards of 5 GB;
``--max-shard-size 2GB`` asks for size-based shards explicitly.
Config, tokenizer and generation config come from ``<ckpt>/hf/`` (or ``--hf-meta`` / ``--like``).
``--format slime`` reads a checkpoint in slime's layout (slime's converter output or a slime run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qnext.errors import UserError, cli_main, interrupt_on_sigterm  # noqa: E402


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        raise UserError(f"--max-shard-size {text!r} is not a size", hint="e.g. 5GB, 500MB, 4GiB") from None



@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="torch_dist checkpoint: the --save/--load root or an iteration dir")
    ap.add_argument("--out", required=True, help="output HF directory (created; must be empty or new)")
    ap.add_argument("--like", default=None, help="original HF checkpoint: reproduce its shard names and assignment")
    ap.add_argument("--hf-meta", default=None, help="directory with config.json + tokenizer (default: <ckpt>/hf)")
    ap.add_argument("--dtype", default="keep",
                    help="keep (default: each tensor in its original HF dtype, else as stored) | bf16 | fp16 | fp32")
    ap.add_argument("--format", default="megatron", dest="fmt",
                    help="layout of CKPT: megatron (default: make convert's) | slime")
    ap.add_argument("--max-shard-size", default=None, type=_size,
                    help="size-based shards of at most this size (e.g. 5GB) instead of the original layout")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output (only once the new one is complete)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    interrupt_on_sigterm()  # a killed job cleans up its partial output

    from qnext.convert import export_torch_dist_to_hf

    export_torch_dist_to_hf(args.ckpt, args.out, like=args.like, hf_meta=args.hf_meta, dtype=args.dtype, fmt=args.fmt,
                            max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                            progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
