"""NF4 (4-bit NormalFloat, torchao) frozen expert weights (``qnext.quant.nf4``) on CPU: the quantization
error stays within the bound derived from the format, the NF4 grouped linear equals the computation with
the dequantized weights exactly (forward and input gradient), and the experts module with NF4 weights
moves its outputs by no more than its weights' own quantization error."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from qnext.quant import nf4  # noqa: E402
from qnext.quant.nf4 import Nf4Stack, error_bound  # noqa: E402
from quant_fixtures import assert_same_as_dequantized, grouped, run_experts, twin_experts, world  # noqa: E402,F401


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 40, 64, generator=g) * torch.logspace(-3, 1, 40)[None, :, None]  # rows of very different size
    w[0, 0] = 0.0  # an all-zero block
    w[1, 1, :5] = 1e-7  # tiny values next to normal ones in their block
    return w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_dequantize_error_within_the_nf4_bound(dtype, monkeypatch):
    w = _weights().to(dtype)
    for chunk in (1 << 26, 40 * 64 * 2):  # one NF4 tensor, and 3 chunks of 2 experts (own scale groups)
        monkeypatch.setattr(nf4, "CHUNK_VALUES", chunk)
        st = Nf4Stack.quantize(w)
        assert len(st.chunks) == (1 if chunk > w.numel() else 3) and st.shape == w.shape
        # 4 bits per value, an int8 scale per 64 values, a factor per group of scales (16 here, 256 when the
        # sizes allow it: 0.516 B per value for the real model)
        assert w.numel() * (0.5 + 1 / 64) < st.nbytes() < 0.53 * w.numel()
        wf = w.float()
        back = st.dequantize(torch.float32)
        assert back.shape == w.shape and st.dequantize().dtype == dtype
        err = (back - wf).abs()
        bound = error_bound(wf)
        ratio = err / bound.clamp_min(1e-30)
        assert bool((err <= bound).all()), float(ratio.max())
        assert float(ratio.max()) > 0.5  # the bound is tight: some values use most of it
        assert bool((back[0, 0] == 0).all())
    # the format's rounding: the widest gap between neighbouring codes is between -1 and -0.6962
    assert abs(nf4.half_gap() - (1.0 - 0.6962) / 2) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pair_table_decoding_equals_torchaos(dtype, monkeypatch):
    """The byte-pair table decoding (``Nf4Stack.dequantize``) against torchao's ``get_original_weight``
    (``reference=True``): the same bits, one NF4 tensor or several chunks, into the stored dtype or another."""
    w = _weights(5).to(dtype)
    for chunk in (1 << 26, 40 * 64 * 2):
        monkeypatch.setattr(nf4, "CHUNK_VALUES", chunk)
        st = Nf4Stack.quantize(w)
        for out_dtype in (dtype, torch.float32):
            fast, ref = st.dequantize(out_dtype), st.dequantize(out_dtype, reference=True)
            assert fast.dtype == ref.dtype == out_dtype and torch.equal(fast, ref)
            assert float(ref.abs().sum()) > 0


def test_nf4_grouped_linear_equals_the_dequantized_computation():
    from qnext.quant.grouped import quantized_grouped_linear

    g = torch.Generator().manual_seed(1)
    st = Nf4Stack.quantize(torch.randn(4, 32, 64, generator=g).to(torch.bfloat16))
    assert_same_as_dequantized(lambda x, counts: quantized_grouped_linear(x, st.dequantize, grouped, counts),
                               st.dequantize(torch.bfloat16), g)


def test_nf4_experts_module_moves_outputs_no_more_than_its_weights(world):
    mods, originals, g = twin_experts()
    mods[1].quantize_("nf4")
    assert mods[1].linear_fc1.quantized and mods[1].linear_fc1.base == "nf4"
    assert not any(True for _ in mods[1].parameters())
    assert "nf4" in repr(mods[1])
    # the module holds exactly what the format makes of its weights, each value within the format's bound
    for n, w in originals.items():
        got = getattr(mods[1], n).dequantized(torch.float32)
        assert torch.equal(got, Nf4Stack.quantize(w).dequantize(torch.float32)), n
        assert bool(((got - w).abs() <= error_bound(w)).all()), n
    # the weights' own quantization error (relative L2)
    w_err = max(float((getattr(mods[1], n).dequantized(torch.float32) - w).norm() / w.norm())
                for n, w in originals.items())
    assert 0 < w_err < 0.15
    outs, grads = run_experts(mods, g)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # each expert computes three quantized products (gate, up, down) whose independent errors add in
    # quadrature: the outputs and input gradients move by about sqrt(3) times the weights' relative error;
    # allow 30% for the SiLU gate's slope (2.25 = 1.3 sqrt(3); measured 1.9 here)
    print(f"nf4 vs fp32 experts: weights {w_err:.4f}, outputs {rel(outs[1], outs[0]):.4f}, "
          f"input grads {rel(grads[1], grads[0]):.4f}")
    assert 0 < rel(outs[1], outs[0]) < 2.25 * w_err
    assert 0 < rel(grads[1], grads[0]) < 2.25 * w_err
    # NF4 experts are frozen copies of the pretrained checkpoint: neither saved nor loaded with the model
    assert mods[1].sharded_state_dict("decoder.layers.0.mlp.experts.") == {}
    assert not any(isinstance(v, torch.Tensor) and "linear_fc" in k for k, v in mods[1].state_dict().items())
    # megatron's Float16Module casts the whole model (.bfloat16()): the NF4 storage is left as it is
    before = mods[1].linear_fc1.nf4.chunks[0].quantized_data.clone()
    mods[1].bfloat16()
    assert torch.equal(mods[1].linear_fc1.nf4.chunks[0].quantized_data, before)
    assert mods[1].linear_fc1.nf4.dtype == torch.float32  # still dequantizes to what it was quantized from


def test_a_refused_quantization_leaves_the_weight_and_moves_keep_the_wrappers_honest(world):
    from qnext.megatron.experts import ExpertWeight

    w = ExpertWeight(2, 60, 60, dtype=torch.float32, device="cpu")  # 3600 values per expert: no 64-value blocks
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="divisible by 64"):
        w.quantize_("nf4")
    assert w.base == "bf16" and not w.quantized and w.weight.shape == (2, 60, 60)  # still usable
    moved = Nf4Stack.quantize(torch.randn(2, 64, 64)).to("meta")
    assert all(c.device.type == "meta" and c.quantized_data.device.type == "meta" for c in moved.chunks)


def test_nf4_without_torchao_is_one_message(monkeypatch):
    import builtins

    from qnext.config import load_config, validate_config
    from qnext.errors import UserError

    real_import = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    assert not nf4.available()
    with pytest.raises(UserError, match="torchao") as e:
        Nf4Stack.quantize(torch.zeros(1, 64, 64))
    assert "pip install" in (e.value.hint or "")
    with pytest.raises(UserError, match="torchao"):
        validate_config(load_config(["recipe=qwen3_next_80b_qlora"]), check_files=False)
