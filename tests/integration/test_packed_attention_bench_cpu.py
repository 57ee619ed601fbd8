"""benchmarks/packed_attention.py on the CPU (a small pack): every variant runs, the masked attention and
the one-pass RoPE reproduce the per-sample versions (outputs and gradients), and the JSON/Markdown are
written. Timings on a CPU mean nothing; the GPU numbers come from the same script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("megatron.core")


def test_packed_attention_benchmark_runs_and_variants_agree(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/packed_attention.py"), "--out", str(tmp_path),
                           "--device", "cpu", "--tokens", "300", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "packed_attention.json").read_text())
    rows = {(r["part"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {("attention", "loop"), ("attention", "masked"), ("rope", "megatron loop"), ("rope", "one pass")}
    assert data["environment"]["chats"] > 5 and data["environment"]["tokens"] == 300
    assert rows[("attention", "masked")]["max_rel_l2_vs_first"] < 1e-5
    assert rows[("rope", "one pass")]["max_rel_l2_vs_first"] == 0.0
    assert all(r["ms_fwd_bwd"] > 0 for r in rows.values())
    assert "| attention | masked |" in (tmp_path / "packed_attention.md").read_text()
