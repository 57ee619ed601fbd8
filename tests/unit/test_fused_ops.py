"""The compiled (fused) elementwise ops of ``qnext.megatron.fused`` against their plain references,
values and gradients, on the CPU (inductor compiles C++ here; on a GPU it writes Triton from the same
graph). Also: CPU tensors and the default take the references; ``QNEXT_FUSED=1`` the compiled forms on CUDA."""
from __future__ import annotations

import pytest
import torch

from qnext.megatron.fused import compiled, rms_norm_reference, swiglu_probs_reference


def _grads(fn, *args):
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    out = fn(*args)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [a.grad for a in args if a.requires_grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # the training dtype (each case is one ~10 s compile)
def test_compiled_swiglu_probs_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(37, 2 * 24, generator=g) * 2).to(dtype)
    probs = torch.rand(37, generator=g)
    ref_out, ref_g = _grads(swiglu_probs_reference, h, probs)
    out, grads = _grads(compiled(swiglu_probs_reference), h, probs)
    assert out.dtype == dtype and out.shape == (37, 24)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(out, ref_out, **tol)
    for a, b in zip(grads, ref_g):
        torch.testing.assert_close(a, b, **tol)
    # and it is SwiGLU times the probability, not something merely self-consistent
    gate, up = h.float().chunk(2, dim=-1)
    expect = gate * torch.sigmoid(gate) * up * probs[:, None]
    torch.testing.assert_close(out.float(), expect, **tol)


@pytest.mark.parametrize("zero_centered", [True])  # Qwen3-Next's norms
def test_compiled_rms_norm_equals_reference(zero_centered):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 32, generator=g).to(torch.bfloat16)
    w = (torch.randn(32, generator=g) * 0.1).to(torch.bfloat16)
    ref_out, ref_g = _grads(lambda a, b: rms_norm_reference(a, b, 1e-6, zero_centered), x, w)
    out, grads = _grads(lambda a, b: compiled(rms_norm_reference)(a, b, 1e-6, zero_centered), x, w)
    torch.testing.assert_close(out, ref_out, rtol=1.6e-2, atol=1e-3)
    for a, b in zip(grads, ref_g):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=2e-2)
    xf = x.float()
    scale = (1 + w.float()) if zero_centered else w.float()
    torch.testing.assert_close(out.float(), xf / xf.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * scale,
                               rtol=1.6e-2, atol=1e-3)


def test_cpu_and_switch_take_the_reference(monkeypatch):
    import qnext.megatron.fused as fused

    calls = []
    monkeypatch.setattr(fused, "compiled", lambda fn: calls.append(fn) or fn)
    h, p = torch.randn(4, 8), torch.rand(4)
    fused.swiglu_probs(h, p)  # a CPU tensor: the reference, never the compiled form
    assert calls == []
    cuda_like = type("T", (), {"is_cuda": True})()
    monkeypatch.setenv("QNEXT_FUSED", "1")
    assert fused._use_compiled(cuda_like)
    monkeypatch.setenv("QNEXT_FUSED", "0")
    assert not fused._use_compiled(cuda_like)
    monkeypatch.delenv("QNEXT_FUSED")
    assert not fused._use_compiled(cuda_like)  # opt-in until checked in a GPU training step
