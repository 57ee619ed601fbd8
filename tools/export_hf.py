#!/usr/bin/env python
"""Export a LoRA run: a PEFT adapter directory and/or a merged HF checkpoint laid out like the base.

  python tools/export_hf.py --run runs/demo/train --merged-out runs/demo/merged --adapter-out runs/demo/adapter
  python tools/export_hf.py --base <hf dir> --adapter <adapter dir> --merged-out <dir>

Thin entry: the work is in ``qnext.export``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qnext.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
