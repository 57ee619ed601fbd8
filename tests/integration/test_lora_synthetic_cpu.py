"""benchmarks/lora_synthetic.py (LoRA steps with synthetic base weights, FP8 or NF4 experts made one
layer at a time) on the tiny config, on CPU: it trains (finite losses, adapters change the loss), and its run record
carries the fields the one-GPU 80B record needs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("base", ["fp8", pytest.param("nf4", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchao") is None, reason="nf4 needs torchao (pip install -e '.[quant]')"))])
def test_synthetic_lora_run_record(tmp_path, base):
    out = tmp_path / "synth"
    cmd = [sys.executable, str(REPO / "benchmarks/lora_synthetic.py"), "--model", str(REPO / "models/tiny_qwen3_next/config.json"),
           "--device", "cpu", "--steps", "3", "--warmup", "1", "--seq", "128", "--base-dtype", base, "--lr", "5e-2",
           "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "lora_synthetic.json").read_text())
    for key in ("layers", "experts", "gpus", "base_dtype", "synthetic_weights", "tokens_per_s_per_gpu", "peak_mem_gib",
                "planned_peak_gib", "losses"):
        assert key in rec, key
    assert rec["synthetic_weights"] is True and rec["base_dtype"] == base and rec["layers"] == 4 and rec["gpus"] == 1
    assert len(rec["losses"]) == 3 and all(0 < x < 50 for x in rec["losses"])
    assert rec["tokens_per_s_per_gpu"] > 0 and rec["planned_peak_gib"] > 0
    assert f"({base})" in proc.stdout and "step 3/3" in proc.stdout
    assert "emulated_ep" not in rec  # the config's own experts


def test_synthetic_run_emulating_one_expert_parallel_rank(tmp_path):
    """--experts 4 of the tiny model's 8 (top-2), two rows per step: one GPU of EP2, bf16 base; the record says what
    it stands for and estimates the all-to-all it leaves out (2 passes x dispatch+combine x 2 x 128 tokens x top-2 x
    hidden 128 x 2 bytes x 1/2 leaving the GPU, per MoE layer); a count that does not divide the experts is one message."""
    out = tmp_path / "ep"
    base = [sys.executable, str(REPO / "benchmarks/lora_synthetic.py"), "--model", str(REPO / "models/tiny_qwen3_next/config.json"),
            "--device", "cpu", "--steps", "2", "--warmup", "1", "--seq", "128", "--base-dtype", "bf16", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(base + ["--experts", "4", "--mbs", "2"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "lora_synthetic.json").read_text())
    cfg = json.loads((REPO / "models/tiny_qwen3_next/config.json").read_text())
    assert rec["experts"] == 4 and rec["emulated_ep"] == 2 and rec["base_dtype"] == "bf16" and rec["micro_batch"] == 2
    assert json.loads((out / "model_config.json").read_text())["num_experts"] == 4  # what the planner read
    moe_layers = cfg["num_hidden_layers"]  # every layer of the tiny model is MoE
    want = 2 * 2 * (2 * 128) * 2 * cfg["hidden_size"] * 2 * 0.5 * moe_layers
    assert rec["a2a_bytes_per_step"] == want
    assert abs(rec["a2a_estimate_s"] - want / 450e9) < 1e-12
    assert "step 2/2" in proc.stdout and all(0 < x < 50 for x in rec["losses"])
    assert all(128 < t <= 256 for t in rec["step_tokens"])  # two rows of at most 128 tokens each, not one
    bad = subprocess.run(base + ["--experts", "3"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert bad.returncode == 2 and "--experts 3" in bad.stderr and "divisor of 8" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = subprocess.run(base + ["--steps", "0"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert bad.returncode == 2 and "--steps 0" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(base + ["--repeat", "0"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert bad.returncode == 2 and "--repeat 0" in bad.stderr and "Traceback" not in bad.stderr
