"""QNEXT_STACK_DUMP_S: a running entry point prints every thread's stack while it runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

PROG = """
import time
from qnext.errors import cli_main

@cli_main
def main():
    def slow_inner_function():
        time.sleep(1.6)
    slow_inner_function()
    return 0

raise SystemExit(main())
"""


def _run(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), QNEXT_STACK_DUMP_S=value)
    return subprocess.run([sys.executable, "-c", PROG], env=env, capture_output=True, text=True, timeout=60)


def test_stacks_are_dumped_while_the_program_runs():
    proc = _run("0.5")
    assert proc.returncode == 0, proc.stderr
    assert "every 0.5s" in proc.stderr
    # at least two dumps in 1.6 s, each naming the function the program is stuck in
    assert proc.stderr.count("slow_inner_function") >= 2, proc.stderr


def test_unset_or_zero_prints_nothing():
    proc = _run("0")
    assert proc.returncode == 0 and "slow_inner_function" not in proc.stderr


def test_bad_value_is_a_clear_error():
    proc = _run("soon")
    assert proc.returncode == 2
    assert "QNEXT_STACK_DUMP_S='soon'" in proc.stderr and "fix:" in proc.stderr and "Traceback" not in proc.stderr
