"""The kernel parity checks can fail: on CPU, the torch implementations (the path the CPU backends
use) pass against the float32 references, and the same check with the test-only perturbation flag
(each output scaled by 1.05) is reported failing with its error numbers. The GPU variant of this test
(fla's Triton kernel) is tests/gpu/test_kernel_parity_gpu.py."""
from __future__ import annotations

import pytest
import torch

from qnext.kernels import attention, gdn, moe
from qnext.kernels.report import PERTURB_ENV, PERTURB_SCALE

CPU = torch.device("cpu")
SMALL_GDN = gdn.GDNCase(128, H=2, HV=4, K=32, V=32)


def test_torch_gdn_passes_then_fails_when_perturbed(monkeypatch):
    row, ref = gdn.check_case(SMALL_GDN, "torch", CPU)
    assert row.passed, row.line()
    assert max(row.errors.values()) < 1e-4, row.line()  # fp32 chunked vs fp32 recurrent

    monkeypatch.setenv(PERTURB_ENV, "gdn")
    bad, _ = gdn.check_case(SMALL_GDN, "torch", CPU, ref=ref)
    assert not bad.passed
    assert set(bad.errors) == set(gdn.QUANTITIES)
    for q, err in bad.errors.items():
        assert err == pytest.approx(PERTURB_SCALE, rel=0.05), bad.line()
    line = bad.line()
    assert line.startswith("FAIL") and "o 5.00e-02!(>0.01)" in line, line


def test_perturbation_is_scoped_to_the_named_kernel(monkeypatch):
    monkeypatch.setenv(PERTURB_ENV, "moe")
    row, _ = gdn.check_case(SMALL_GDN, "torch", CPU)
    assert row.passed, row.line()


def test_attention_and_moe_checks_fail_when_perturbed(monkeypatch):
    acase = attention.AttnCase(64, Hq=4, Hkv=2, D=32)
    mcase = moe.MoECase(64, experts=8, topk=2, hidden=64, ffn=32)
    good = attention.check_case(acase, ("eager", "sdpa"), CPU, dtype=torch.float32)
    good += moe.check_case(mcase, ("sequential",), CPU, dtype=torch.float32)
    assert good and all(r.passed for r in good), "\n".join(r.line() for r in good)

    monkeypatch.setenv(PERTURB_ENV, "attention,moe")
    bad = attention.check_case(acase, ("eager", "sdpa"), CPU, dtype=torch.float32)
    bad += moe.check_case(mcase, ("sequential",), CPU, dtype=torch.float32)
    assert bad and not any(r.passed for r in bad), "\n".join(r.line() for r in bad)
    assert all(r.errors and max(r.errors.values()) >= 0.04 for r in bad), "\n".join(r.line() for r in bad)


def test_a_config_that_cannot_launch_is_skipped_but_a_crash_fails():
    """Autotune sweep rows: an OutOfResources config (Triton's autotuner discards it) is reported as
    SKIP and does not fail the suite; any other error, or an error without the skip mark, fails."""
    from qnext.kernels.report import Check, markdown_table

    oom = "OutOfResources: out of resource: shared memory, Required: 255500, Hardware limit: 232448."
    crashed = Check("gdn", "T=2048", "fla", {}, {"o": 1e-2}, error=oom)
    assert not crashed.passed and crashed.line().startswith("FAIL")
    skipped = Check("gdn", "T=2048", "fla", {}, {"o": 1e-2}, error=oom, skipped="does not fit")
    assert skipped.passed and skipped.line().startswith("SKIP")
    bad = Check("gdn", "T=2048", "fla", {"o": 2e-2}, {"o": 1e-2})
    assert not bad.passed
    table = markdown_table([skipped, bad])
    assert "skipped: does not fit" in table and "| FAIL |" in table
