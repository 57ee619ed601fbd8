"""Find the host-device synchronisations of one training step.

``QNEXT_SYNC_CHECK=N`` runs step N under ``torch.cuda.set_sync_debug_mode("warn")``: every CUDA call
that makes the host wait for the GPU (``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero``, boolean
indexing, blocking copies, ``torch.cuda.synchronize``) warns, and :class:`SyncCheck` records where
from. ``<out_dir>/syncs_step<N>_rank<R>.json`` lists them, each with its caller outside torch and a
count; a sync at a place in :data:`PLANNED` is marked planned (with the reason), any other is not.
``tests/gpu/test_megatron_train_gpu.py`` fails on an unplanned one.
"""
from __future__ import annotations

import json
import os
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

ENV = "QNEXT_SYNC_CHECK"

# (file suffix, function) -> why the step may wait there
PLANNED: dict[tuple[str, str], str] = {
    ("megatron/core/optimizer/clip_grads.py", "get_grad_norm_fp32"):
        "gradient clipping needs the global gradient norm on the host (once per step)",
    ("megatron/core/optimizer/optimizer.py", "step"):
        "megatron's optimizer step reads the grad norm / skip decision on the host (once per step)",
    ("megatron/core/optimizer/distrib_optimizer.py", "step_with_ready_grads"):
        "megatron's optimizer step (once per step)",
    ("megatron/training/utils/common_utils.py", "logical_and_across_model_parallel_group"):
        "train_step agrees on the update across model-parallel ranks, after the optimizer step (once per step; "
        "a one-rank group skips it: qnext.megatron.compat.step_reductions)",
    ("megatron/training/utils/common_utils.py", "reduce_max_stat_across_model_parallel_group"):
        "train_step shares the gradient norm across model-parallel ranks, after the optimizer step (once per "
        "step; a one-rank group skips it: qnext.megatron.compat.step_reductions)",
}


def sync_check_wanted(step: int) -> bool:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return False
    try:
        return int(raw) == step
    except ValueError:
        from .errors import UserError

        raise UserError(f"{ENV}={raw!r} is not a step number", hint=f"e.g. {ENV}=3 (a step after the first)") from None


def _caller(stack: list[traceback.FrameSummary]) -> list[str]:
    """The frames outside torch and this module, innermost first (at most 6)."""
    out = []
    for fr in reversed(stack):
        f = fr.filename.replace(os.sep, "/")
        if "/torch/" in f or f.endswith("/qnext/syncs.py") or "/warnings.py" in f:
            continue
        out.append(f"{f}:{fr.lineno} {fr.name}")
        if len(out) == 6:
            break
    return out


def planned_reason(frames: list[str]) -> Optional[str]:
    for fr in frames:
        path, _, name = fr.rpartition(" ")
        path = path.rsplit(":", 1)[0]
        for (suffix, func), why in PLANNED.items():
            if path.endswith(suffix) and name == func:
                return why
    return None


class SyncCheck:
    """``with SyncCheck(step, out_dir, rank):`` around one step (see the module docstring)."""

    def __init__(self, step: int, out_dir: str | os.PathLike, rank: int = 0):
        self.step, self.out_dir, self.rank = step, Path(out_dir), rank
        self.active = sync_check_wanted(step)
        self.path: Optional[Path] = None
        self.records: list[dict[str, Any]] = []

    def __enter__(self) -> "SyncCheck":
        if not self.active:
            return self
        import torch

        self._seen: dict[tuple[str, ...], int] = {}
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchronizing CUDA operation" in str(message):
                key = tuple(_caller(traceback.extract_stack()))
                self._seen[key] = self._seen.get(key, 0) + 1
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        self.records = [{"count": n, "frames": list(k), "planned": planned_reason(list(k))}
                        for k, n in sorted(self._seen.items(), key=lambda kv: -kv[1])]
        from .fsutil import atomic_write_text

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"syncs_step{self.step}_rank{self.rank}.json"
        atomic_write_text(self.path, json.dumps({"step": self.step, "syncs": self.records}, indent=1) + "\n")

    @property
    def unplanned(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not r["planned"]]
