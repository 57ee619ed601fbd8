#!/usr/bin/env python
"""Write a seeded random Qwen3-Next HF checkpoint in the hub's layout (sharded safetensors + index,
config.json, generation_config.json, tokenizer files; per-expert on-disk tensor names).

  python tools/make_tiny_checkpoint.py --out runs/tiny-hf
  python tools/make_tiny_checkpoint.py --out runs/tiny-hf --with-mtp --dtype bf16 --shard-mb 20 --set vocab_size=512
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qnext.errors import UserError, cli_main  # noqa: E402


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY=VALUE", hint="e.g. --set vocab_size=512 --set num_experts=4")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created; must be empty or new)")
    ap.add_argument("--config", default="models/tiny_qwen3_next/config.json", help="HF config.json of the architecture")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16")
    ap.add_argument("--shard-mb", type=float, default=50.0, help="max shard size in MiB (default 50)")
    ap.add_argument("--with-mtp", action="store_true", help="also write the MTP block (mtp.*) as the real checkpoint has")
    ap.add_argument("--perturb", action="store_true",
                    help="move norms, dt_bias and A_log off their initial values (for tests comparing implementations)")
    ap.add_argument("--tokenizer", default=None, help="copy this tokenizer directory (default: built-in Qwen3-Next)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config.json key (JSON value), repeatable")
    ap.add_argument("--max-total-gib", type=float, default=8.0,
                    help="refuse checkpoints larger than this (default 8; raise it for a real-width proxy)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output (only once the new one is complete)")
    args = ap.parse_args(argv)

    from qnext.models.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.out, config_path=args.config, seed=args.seed, dtype=args.dtype,
                                max_shard_bytes=int(args.shard_mb * 2**20), overrides=dict(map(_override, args.overrides)),
                                overwrite=args.overwrite, with_mtp=args.with_mtp, perturb=args.perturb, tokenizer_path=args.tokenizer,
                                max_total_bytes=int(args.max_total_gib * 2**30))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n_shards = len(set(index["weight_map"].values()))
    print(f"wrote {out}: {len(index['weight_map'])} tensors, {index['metadata']['total_size'] / 2**20:.1f} MiB "
          f"in {n_shards} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
