#!/usr/bin/env python
"""Golden torch_dist manifest of the Megatron Qwen3-Next model (needs a GPU: megatron's save does).

Builds the model from an HF config.json, saves it with megatron-core's own
``dist_checkpointing.save`` and writes every checkpoint key with its global shape and dtype.

  python tools/dump_megatron_manifest.py                      # tiny model -> tests/fixtures/megatron_manifest_tiny.json
  python tools/dump_megatron_manifest.py --ckpt-dir /tmp/ckpt --out out.json --dtype bfloat16
  python tools/dump_megatron_manifest.py --read CKPT_DIR      # print the manifest of any torch_dist checkpoint (CPU)
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qnext.errors import cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-config", default=str(REPO / "models/tiny_qwen3_next/config.json"))
    ap.add_argument("--out", default=str(REPO / "tests/fixtures/megatron_manifest_tiny.json"))
    ap.add_argument("--ckpt-dir", default=None, help="where to save the checkpoint (default: a temporary dir)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the config's torch_dtype)")
    ap.add_argument("--read", metavar="CKPT_DIR", help="only print the manifest of an existing checkpoint")
    args = ap.parse_args(argv)

    from qnext.megatron.manifest import dump_model_manifest, read_manifest

    if args.read:
        print(json.dumps(read_manifest(args.read), indent=1))
        return 0

    import torch

    cfg = json.loads(Path(args.hf_config).read_text())
    dtype_name = args.dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    dtype = getattr(torch, dtype_name)
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt_dir or str(Path(tmp) / "ckpt")
        manifest = dump_model_manifest(args.hf_config, args.out, ckpt, dtype=dtype, command=command)
    print(f"{len(manifest['tensors'])} tensors, {len(manifest['objects'])} objects -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
