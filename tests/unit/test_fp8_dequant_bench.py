"""benchmarks/fp8_dequant.py on the CPU at small shapes: every variant runs, gives the eager form's bits, and the
record names each shape and variant (the GPU run decides between the compiled forms)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dequantization_variants_recorded_with_the_same_bits(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks/fp8_dequant.py"), "--device", "cpu", "--experts", "2", "--hidden", "64",
           "--ffn", "24", "--iters", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "fp8_dequant.json").read_text())
    got = {(r["weight"], r["variant"]): r for r in rec["rows"]}
    assert set(got) == {(w, v) for w in ("fc1", "fc2") for v in ("eager", "compiled_dynamic", "compiled_static")}
    assert got["fc1", "eager"]["shape"] == [2, 48, 64] and got["fc2", "eager"]["shape"] == [2, 64, 24]
    assert all(r["equal_to_eager"] and r["ms"] > 0 for r in rec["rows"])
    bad = subprocess.run(cmd[:-2] + ["--iters", "0", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert bad.returncode == 2 and "--iters 0" in bad.stderr and "Traceback" not in bad.stderr
