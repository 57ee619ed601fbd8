"""Relative-error rows, thresholds and tables shared by every kernel check.

A check compares one implementation ("candidate") with a float32/float64 reference on the same
inputs: ``rel = ||candidate - reference|| / ||reference||`` per output and per gradient. A row
passes when every value is finite and at most its threshold; NaN or Inf always fails, and so does
an exception (its text is kept in the row).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

# Set only by tests: a comma-separated list of kernel names ("gdn", "attention", "moe") or "all".
# The named candidates get their output scaled by (1 + PERTURB_SCALE) so the check must fail.
PERTURB_ENV = "QNEXT_TEST_PERTURB_KERNEL"
PERTURB_SCALE = 0.05


def perturbed(kernel: str) -> bool:
    wanted = {s.strip() for s in os.environ.get(PERTURB_ENV, "").split(",") if s.strip()}
    return kernel in wanted or "all" in wanted


def rel_err(candidate: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    """||a - r|| / ||r|| in float64; NaN when the candidate has a non-finite value or is missing."""
    if candidate is None or reference is None:
        return math.nan
    a = candidate.detach().to(torch.float64)
    r = reference.detach().to(torch.float64)
    if a.shape != r.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(r.shape)}")
    if not torch.isfinite(a).all():
        return math.nan
    denom = r.norm().item()
    num = (a - r).norm().item()
    return num / denom if denom > 0 else (0.0 if num == 0 else math.inf)


@dataclass
class Check:
    """One row: a kernel, a case (shape + inputs), an implementation, its errors and thresholds."""

    kernel: str
    case: str
    impl: str
    errors: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # exception text, if the candidate crashed
    seconds: float = 0.0
    note: str = ""
    # set when the candidate cannot run here at all and would never be picked (an autotune config
    # that does not fit the GPU's shared memory: Triton's autotuner discards it); not a failure
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        if self.skipped is not None:
            return True
        if self.error is not None or not self.errors:
            return False
        return all(math.isfinite(v) and v <= self.thresholds.get(k, math.inf) for k, v in self.errors.items())

    def worst(self) -> tuple[str, float, float]:
        """(quantity, error, threshold) with the largest error/threshold ratio; NaN first."""
        def ratio(item):
            k, v = item
            return math.inf if not math.isfinite(v) else v / self.thresholds.get(k, math.inf)
        k, v = max(self.errors.items(), key=ratio)
        return k, v, self.thresholds.get(k, math.inf)

    def detail(self) -> str:
        """'case: quantity error ...' with '!' after each value over its threshold."""
        if self.error is not None:
            return f"{self.case}: error: {self.error}"
        parts = []
        for k, v in self.errors.items():
            thr = self.thresholds.get(k, math.inf)
            flag = "" if math.isfinite(v) and v <= thr else f"!(>{thr:g})"
            parts.append(f"{k} {v:.2e}{flag}")
        note = f" [{self.note}]" if self.note else ""
        return f"{self.case}: " + " ".join(parts) + f" ({self.seconds:.1f}s){note}"

    def line(self) -> str:
        verdict = "SKIP" if self.skipped is not None else ("PASS" if self.passed else "FAIL")
        return f"{verdict} {self.kernel:9s} {self.impl:10s} {self.detail()}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["errors"] = {k: (None if not math.isfinite(v) else v) for k, v in self.errors.items()}
        d["passed"] = self.passed
        return d


def threshold_line(thresholds: dict[str, float]) -> str:
    return ", ".join(f"{k} <= {v:g}" for k, v in thresholds.items())


def markdown_table(checks: Iterable[Check]) -> str:
    """One Markdown table per kernel: case, impl, each quantity's relative error, result."""
    checks = list(checks)
    out = []
    for kernel in dict.fromkeys(c.kernel for c in checks):
        rows = [c for c in checks if c.kernel == kernel]
        keys = list(dict.fromkeys(k for c in rows for k in c.errors))
        thr = rows[0].thresholds
        out.append(f"**{kernel}** (relative error vs float32 reference; thresholds: {threshold_line(thr)})\n")
        out.append("| case | impl | " + " | ".join(keys) + " | result |")
        out.append("|---|---|" + "---|" * len(keys) + "---|")
        for c in rows:
            if c.error is not None:
                vals = ["—"] * len(keys)
                res = f"skipped: {c.skipped}" if c.skipped is not None else f"FAIL: {c.error[:80]}"
            else:
                vals = [("NaN" if not math.isfinite(c.errors[k]) else f"{c.errors[k]:.1e}") if k in c.errors else "" for k in keys]
                res = "skipped" if c.skipped is not None else ("pass" if c.passed else "FAIL")
            out.append(f"| {c.case} | {c.impl} | " + " | ".join(vals) + f" | {res} |")
        out.append("")
    return "\n".join(out)


def write_json(path: str, checks: Iterable[Check], **meta) -> None:
    with open(path, "w") as f:
        json.dump({**meta, "checks": [c.to_json() for c in checks]}, f, indent=1)
