"""GPU: fla GDN, attention and MoE parity at Qwen3-Next shapes; the perturbed kernel fails; the guard.

Run with `make test-gpu` (or `pytest -m gpu tests/gpu/test_kernel_parity_gpu.py`) after `make patch`.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HOPPER_GUARDED = False
if torch.cuda.is_available():
    import importlib.metadata as md

    from packaging.version import Version

    HOPPER_GUARDED = (torch.cuda.get_device_capability(0)[0] == 9
                      and Version("3.4.0") <= Version(md.version("triton").split("+")[0]) < Version("3.7.1"))


def test_gdn_fast_suite_passes():
    from qnext.kernels.suites import run_suite

    rows = run_suite("gdn-fast", torch.device("cuda"))
    assert rows and all(r.passed for r in rows), "\n".join(r.line() for r in rows)


def test_perturbed_fla_kernel_is_reported_failing(monkeypatch):
    from qnext.kernels import gdn
    from qnext.kernels.report import PERTURB_ENV

    monkeypatch.setenv(PERTURB_ENV, "gdn")
    with gdn.fla_checking():
        row, _ = gdn.check_case(gdn.GDNCase(1024), "fla", torch.device("cuda"))
    assert not row.passed
    assert row.errors["o"] == pytest.approx(0.05, rel=0.2), row.line()
    assert "FAIL" in row.line() and "!" in row.line()


def test_attention_and_moe_fast():
    from qnext.kernels import attention, moe

    rows = attention.check_case(attention.AttnCase(1024), ("eager", "sdpa", "flex"), torch.device("cuda"))
    rows += moe.check_case(moe.MoECase(1024, 64), ("sequential", "grouped"), torch.device("cuda"))
    assert all(r.passed for r in rows), "\n".join(r.line() for r in rows)


@pytest.mark.skipif(not HOPPER_GUARDED, reason="the fla #640 guard exists only on Hopper with Triton [3.4, 3.7.1)")
def test_guard_lifted_only_by_a_passing_record(tmp_path, monkeypatch):
    from qnext.kernels import gdn
    from qnext.kernels.record import guard_module, record_gdn_parity
    from qnext.kernels.suites import run_suite

    mod = guard_module()
    if mod is None:
        pytest.skip("patch fla-hopper-gated-dqkwg not applied (make patch)")
    monkeypatch.setenv("QNEXT_FLA_PARITY_STAMP", str(tmp_path / "parity.json"))
    monkeypatch.delenv("QNEXT_FLA_PARITY_CHECK_RUNNING", raising=False)
    mod._QNEXT_PARITY_OK.clear()
    x = gdn.make_inputs(gdn.GDNCase(256), torch.device("cuda"), torch.bfloat16)
    with pytest.raises(RuntimeError, match="parity check"):
        gdn.run_fla(x, gdn.GDNCase(256))  # no record yet: refused
    rows = run_suite("gdn-fast", torch.device("cuda"))
    assert "PASSED" in record_gdn_parity(rows)
    o, grads = gdn.run_fla(x, gdn.GDNCase(256))  # now allowed, without the checking bypass
    assert torch.isfinite(grads["dk"]).all()
    mod._QNEXT_PARITY_OK.clear()
