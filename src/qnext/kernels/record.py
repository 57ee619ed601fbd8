"""The parity record that lets the patched fla run its guarded Hopper path (patch fla-hopper-gated-dqkwg).

The patched ``fla/ops/common/chunk_o.py`` refuses the gated backward on Hopper + Triton [3.4, 3.7.1)
unless this record says the GDN parity check passed for the same GPU name, compute capability,
Triton, torch and patched source. The key comes from the patched module itself, so writer and
reader cannot disagree. The record lives in ``~/.cache/qnext/fla_parity.json`` (or
``$QNEXT_FLA_PARITY_STAMP``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path

from .report import Check


def guard_module():
    """The patched fla module, or None when fla is missing or the patch is not applied."""
    try:
        import fla.ops.common.chunk_o as mod
    except Exception:
        return None
    return mod if hasattr(mod, "_qnext_parity_key") else None


def record_gdn_parity(rows: list[Check], device_index: int = 0) -> str:
    """Write pass/fail of the GDN rows for this GPU + software; returns a one-line summary."""
    import torch
    import triton

    mod = guard_module()
    if mod is None:
        return "not recorded: fla patch fla-hopper-gated-dqkwg is not applied here (nothing reads the record)"
    gdn = [r for r in rows if r.kernel == "gdn"]
    if not gdn:
        return "not recorded: no GDN rows ran"
    passed = all(r.passed for r in gdn)
    key = mod._qnext_parity_key(torch.cuda.get_device_name(device_index), torch.cuda.get_device_capability(device_index),
                                triton.__version__, torch.__version__)
    path = Path(mod._qnext_parity_stamp_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    worst = max((r.worst() for r in gdn if r.errors), key=lambda w: w[1] / w[2] if w[2] else 0, default=None)
    data[key] = {
        "passed": passed,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cases": len(gdn),
        "failed": [f"{r.case} [{r.impl}]" for r in gdn if not r.passed],
        "worst": None if worst is None else {"quantity": worst[0], "rel_err": worst[1], "threshold": worst[2]},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fla_parity.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    state = "PASSED: guarded fla path enabled" if passed else "FAILED: guarded fla path stays refused"
    return f"{state} for {key} ({path})"


def recorded(device_index: int = 0) -> bool | None:
    """Whether this machine has a passing record (None: patch not applied or no GPU)."""
    import torch

    mod = guard_module()
    if mod is None or not torch.cuda.is_available():
        return None
    return mod._qnext_parity_passed(torch.device("cuda", device_index))
