"""Resume of megatron-core's DistributedOptimizer (torch Adam, no Apex/TE) on the CPU, with megatron's
own optimizer, sharded state dicts and load path (``megatron_resume_worker.py``; the file round trip is
in memory). What qnext's Megatron entry does around ``load_checkpoint`` is what makes it exact:

- without ``prime_adam_states`` the load fails inside megatron (``assert len(steps) == 1``);
- without ``unshare_adam_steps`` the three steps after the resume differ from the uninterrupted run;
- with both (and ``restore_adam_steps``), the weights after 3 + 3 steps equal the uninterrupted 6 steps
  bit for bit, also when the load left a wrong step count behind;
- on torch's fused AdamW (``use_fused_adam``, the entry's default without TE/Apex) likewise, and fused
  agrees with foreach Adam to float32 rounding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("megatron_resume_worker.py")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def run(mode: str) -> dict:
    # a world of one of its own: earlier tests in this process may have left torch.distributed's variables set
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(WORKER), mode], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resume_is_exact_with_the_repairs():
    out = run("fixed")
    assert out["after_load"]["steps"] == [3.0] and out["after_load"]["exp_avg_abs_mean"] > 0
    assert out["max_abs_diff"] == 0.0, out


@pytest.mark.parametrize("mode, broken", [("no-prime", "load_error"), ("no-unshare", "drift")])
def test_each_repair_is_needed(mode, broken):
    out = run(mode)
    if broken == "load_error":
        assert "AssertionError" in out.get("load_error", ""), out
    else:
        assert out["max_abs_diff"] > 1e-4, out


def test_a_wrong_restored_step_is_set_from_the_iteration():
    out = run("step-zero")
    assert out["after_load"]["steps"] == [0.0] and out["restored"] == 2
    assert out["max_abs_diff"] == 0.0, out


def test_fused_adam_resume_is_exact_and_matches_foreach():
    out = run("fused")
    assert out["fused_groups"] == 1 and out["fused_after_load"] == [True]
    assert out["max_abs_diff"] == 0.0, out
    mixed = run("fused-vs-foreach")  # uninterrupted on foreach Adam, resumed on fused
    assert 0.0 <= mixed["max_abs_diff"] < 1e-5, mixed
