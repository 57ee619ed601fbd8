"""qnext.megatron.layout_check.compare on hand-made runs: the per-tensor differences, and in bf16 the
per-tensor limits taken from the single rank's own bf16-vs-fp32 difference."""
from __future__ import annotations

import json

import pytest
import torch

from qnext.errors import UserError
from qnext.megatron.layout_check import compare, markdown


def _run(path, grads: dict, loss: float, layout: dict):
    path.mkdir()
    torch.save(grads, path / "grads.pt")
    norm = sum(float(v.double().norm()) ** 2 for v in grads.values()) ** 0.5
    (path / "summary.json").write_text(json.dumps({"layout": layout, "loss": loss, "loss_tokens": 10, "grad_norm": norm}))


def test_compare_reports_each_tensor_against_its_bf16_limit(tmp_path):
    one, tp2 = {"tp": 1}, {"tp": 2, "sp": True}
    fp32 = {"router": torch.tensor([1.0, 0.0]), "norm": torch.tensor([0.0, 1.0])}
    bf16 = {"router": torch.tensor([0.6, 0.0]), "norm": torch.tensor([0.0, 1.001])}  # router: 40% rounding noise
    layout = {"router": torch.tensor([0.9, 0.0]), "norm": torch.tensor([0.0, 1.2])}  # router 50%, norm 20%
    _run(tmp_path / "fp32", fp32, 2.0, one)
    _run(tmp_path / "ref", bf16, 2.0, one)
    _run(tmp_path / "tp2", layout, 2.002, tp2)
    [plain] = compare([tmp_path / "ref", tmp_path / "tp2"])
    assert plain["layout"] == "tp2_sp" and plain["reference"] == "1rank"
    assert plain["worst_tensor"] == "router" and plain["worst_tensor_rel_l2"] == pytest.approx(0.5)
    assert plain["loss_rel_diff"] == pytest.approx(1e-3) and "worst_excess" not in plain
    [noisy] = compare([tmp_path / "ref", tmp_path / "tp2"], noise=tmp_path / "fp32", floor=0.05)
    # router: limit 2 x 0.4 = 0.8, excess 0.5 / 0.8; norm: limit max(2 x 0.001, 0.05), excess (0.199 / 1.001) / 0.05
    assert noisy["worst_excess_tensor"] == "norm" and noisy["worst_excess"] == pytest.approx(0.199 / 1.001 / 0.05)
    assert noisy["worst_excess_limit"] == pytest.approx(0.05)
    assert "its bf16 limit" in markdown([noisy]) and "`norm` 3.98 (limit 5.0e-02)" in markdown([noisy])
    # a layout off only where bf16 rounding alone moves things by 40%: 50% is within 2 x 40%
    _run(tmp_path / "ep2", {"router": torch.tensor([0.9, 0.0]), "norm": bf16["norm"].clone()}, 2.0, {"ep": 2})
    [router_only] = compare([tmp_path / "ref", tmp_path / "ep2"], noise=tmp_path / "fp32", floor=0.05)
    assert router_only["worst_excess_tensor"] == "router"
    assert router_only["worst_excess"] == pytest.approx(0.5 / 0.8) and router_only["worst_excess_limit"] == pytest.approx(0.8)
    with pytest.raises(UserError, match="no summary.json"):
        compare([tmp_path / "ref", tmp_path / "missing"])
