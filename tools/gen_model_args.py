#!/usr/bin/env python
"""Write models/<name>.sh (Megatron-LM) and models/<name>.slime.sh (slime) MODEL_ARGS for every model
in models/*/config.json.

  python tools/gen_model_args.py            # (re)write the files
  python tools/gen_model_args.py --check    # exit 1 if a file is missing or stale (CI)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qnext.errors import cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(REPO / "models"), help="the model registry directory")
    ap.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = ap.parse_args(argv)

    import json

    from qnext.models.megatron_args import registry, render_sh, render_slime_sh

    models = Path(args.models)
    stale = []
    for name, cfg_path in registry(models).items():
        rel, cfg = cfg_path.relative_to(models.parent).as_posix(), json.loads(cfg_path.read_text())
        for out, text in ((models / f"{name}.sh", render_sh(name, rel, cfg)),
                          (models / f"{name}.slime.sh", render_slime_sh(name, rel, cfg))):
            if args.check:
                if not out.is_file() or out.read_text() != text:
                    stale.append(out)
                continue
            out.write_text(text)
            print(f"wrote {out}")
    if stale:
        print("stale: " + ", ".join(map(str, stale)) + " (run `make model-args`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
