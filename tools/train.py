#!/usr/bin/env python
"""Train with the FSDP backend: ``python tools/train.py recipe=tiny_lora_cpu model.checkpoint=<hf dir> ...``.

Thin entry: the loop, defaults and checks are in ``qnext.fsdp.train``. Several processes: torchrun or
``NPROC=2 bash scripts/run-fsdp.sh ...``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qnext.fsdp.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
