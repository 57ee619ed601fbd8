"""FP8 (e4m3, per-row scales) frozen expert weights (``qnext.quant.fp8``) on CPU: the quantization error
stays within the format's bound, the FP8 grouped linear equals the bf16 computation with the
dequantized weights exactly (forward and input gradient), and the experts module with FP8 weights
stays within the tolerance the bound implies of the bf16 one."""
from __future__ import annotations

import pytest
import torch

from qnext.quant.fp8 import FP8, dequantize_rows, dequantize_rows_reference, error_bound, quantize_rows
from qnext.quant.grouped import quantized_grouped_linear
from quant_fixtures import assert_same_as_dequantized, grouped, run_experts, twin_experts, world  # noqa: F401


def test_quantize_dequantize_error_within_the_format_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, 64, generator=g) * torch.logspace(-3, 1, 40)[None, :, None]  # rows of very different size
    w[0, 0] = 0.0  # an all-zero row
    w[1, 1, :5] = 1e-7  # values deep in the subnormal range of their row
    q, scale = quantize_rows(w.to(torch.bfloat16))
    assert q.dtype == FP8 and scale.shape == (6, 40, 1) and q.shape == w.shape
    assert float(q.float().abs().max()) <= 448.0
    wb = w.to(torch.bfloat16).float()
    err = (dequantize_rows(q, scale, torch.float32) - wb).abs()
    assert bool((err <= error_bound(wb, scale) * (1 + 1e-6)).all()), float((err / error_bound(wb, scale)).max())
    assert bool((dequantize_rows(q, scale, torch.float32)[0, 0] == 0).all())
    # the bound is tight: some elements use most of it (else it would not test anything)
    assert float((err / error_bound(wb, scale)).max()) > 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [1 << 26, 32 * 7])
def test_two_pass_dequantization_equals_the_plain_one(dtype, chunk, monkeypatch):
    from qnext.quant import fp8

    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 48, 32, generator=g) * torch.logspace(-8, 3, 48)[None, :, None]
    w[0, :, :4] = 1e-9  # subnormal in e4m3 relative to their row
    q, scale = quantize_rows(w)
    monkeypatch.setattr(fp8, "CHUNK_VALUES", chunk)  # 7 rows at a time: chunks cross expert boundaries
    fast, ref = dequantize_rows(q, scale, dtype), dequantize_rows_reference(q, scale, dtype)
    assert fast.dtype == ref.dtype == dtype and torch.equal(fast, ref)


def test_storage_built_on_the_default_device_stays_there_through_casts():
    """Built with device=None under a default device (here meta, as a meta-device construction does), the
    FP8 storage keeps that device through megatron's .bfloat16() cast (it was sent to the CPU)."""
    from qnext.megatron.experts import ExpertWeight

    with torch.device("meta"):
        m = ExpertWeight(2, 16, 32, dtype=torch.bfloat16, device=None, base="fp8")
    m.bfloat16()
    assert m.q.device.type == "meta" and m.scale.device.type == "meta" and m.q.dtype == FP8


def test_quantizing_a_chunk_of_rows_at_a_time_changes_nothing(monkeypatch):
    """Rows are quantized independently: chunks of 7 rows (crossing expert boundaries) give the same bits as
    one pass, and ``out=`` fills the given storage in place."""
    from qnext.quant import fp8

    w = torch.randn(6, 40, 64, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 1, 40)[None, :, None]
    q1, s1 = quantize_rows(w)
    monkeypatch.setattr(fp8, "CHUNK_VALUES", 64 * 7)
    out = (torch.empty(w.shape, dtype=FP8), torch.zeros(6, 40, 1))
    q2, s2 = quantize_rows(w, out=out)
    assert q2 is out[0] and s2 is out[1]
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


def test_fp8_grouped_linear_equals_the_dequantized_bf16_computation():
    g = torch.Generator().manual_seed(1)
    q, scale = quantize_rows(torch.randn(4, 24, 32, generator=g))
    dequantize = lambda dtype: dequantize_rows(q, scale, dtype)  # what ExpertWeight.dequantized does for fp8
    assert_same_as_dequantized(lambda x, counts: quantized_grouped_linear(x, dequantize, grouped, counts),
                               dequantize_rows(q, scale, torch.bfloat16), g)


def test_fp8_experts_module_within_the_bound_of_bf16(world):
    mods, _, g = twin_experts()
    mods[1].quantize_("fp8")
    assert mods[1].linear_fc1.quantized and not any(True for _ in mods[1].parameters())
    outs, grads = run_experts(mods, g)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # each weight is off by at most 2^-4 of itself (normal range); rounding errors of independent weights
    # add in quadrature, so the outputs move by about 2^-4/sqrt(3) = 3.6% (relative L2): allow 2^-4
    print("fp8 vs bf16 experts, rel L2 (out, input grad):", rel(outs[1], outs[0]), rel(grads[1], grads[0]))
    assert 0 < rel(outs[1], outs[0]) < 2.0**-4
    assert 0 < rel(grads[1], grads[0]) < 2.0**-4
    # FP8 experts are frozen copies of the pretrained checkpoint: neither saved nor loaded with the model
    # (qnext.megatron.quant_load fills them), and not in the module's state dict
    assert mods[1].sharded_state_dict("decoder.layers.0.mlp.experts.") == {}
    assert not any(k.endswith((".q", ".scale")) for k in mods[1].state_dict())
    assert mods[0].sharded_state_dict("decoder.layers.0.mlp.experts.")


def test_trained_weights_are_not_quantized(world):
    from qnext.megatron.experts import ExpertWeight

    m = ExpertWeight(2, 4, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="frozen"):
        m.quantize_("fp8")
