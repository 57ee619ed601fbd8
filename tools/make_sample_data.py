#!/usr/bin/env python
"""Write the bundled sample data (data/sample/chats.jsonl + eval_prompts.jsonl), deterministically.

  python tools/make_sample_data.py [--out data/sample] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qnext.errors import cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/sample", help="output directory (default: data/sample)")
    ap.add_argument("--seed", type=int, default=0, help="shuffling/sampling seed (default: 0)")
    args = ap.parse_args(argv)

    from qnext.data.sample import FACTS, write_sample_data

    paths = write_sample_data(args.out, seed=args.seed)
    for name, p in paths.items():
        n = sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
        print(f"wrote {p} ({n} {name.replace('_', ' ')})")
    print(f"{len(FACTS)} facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
