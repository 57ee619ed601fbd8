"""The compiled (fused) elementwise ops of ``qnext.megatron.fused`` against their plain references,
values and gradients, on the CPU (inductor compiles C++ here; on a GPU it writes Triton from the same
graph). Also: CPU tensors and ``QNEXT_FUSED=0`` take the references; CUDA tensors the compiled forms by default."""
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
    monkeypatch.setenv("QNEXT_FUSED", "1")
    with torch.no_grad():  # held-out evaluation: the reference (no extra graphs for the other grad mode)
        assert not fused._use_compiled(cuda_like)
    monkeypatch.delenv("QNEXT_FUSED")
    assert fused._use_compiled(cuda_like)  # on by default (timed on and off on an H200)


def test_every_norm_variant_of_a_model_gets_its_graph():
    """The variants one model's norms show dynamo (zero-centred or not, eps, rank, dtype, a trained or a
    frozen weight, grad mode): more than dynamo's default 8 graphs per function, which made full training
    of the proxy raise at its held-out evaluation on an H200. Here 24 calls, 16 graphs, dynamo only (no inductor)."""
    from qnext.megatron.fused import compiled, rms_norm_reference

    fn = compiled(rms_norm_reference, "eager")
    n = 0
    for zero_centered, eps in ((True, 1e-6), (False, 1e-6), (True, 1e-5)):
        for shape in ((6, 16), (2, 3, 16)):
            for dtype, trained in ((torch.float32, True), (torch.bfloat16, False)):
                x, w = torch.randn(*shape, dtype=dtype), torch.randn(16, dtype=dtype).requires_grad_(trained)
                for grad in (True, False):
                    with torch.set_grad_enabled(grad):
                        got = fn(x, w, eps, zero_centered)
                    torch.testing.assert_close(got, rms_norm_reference(x, w, eps, zero_centered))
                    n += 1
    assert n == 24


def test_native_fused_cross_entropy_equals_megatrons_unfused_one(monkeypatch):
    """QNEXT_FUSED=1 also turns on megatron-core's native fused cross-entropy (config flag); on bf16 logits
    (the training dtype: its backward always returns bf16) its loss and logit gradient equal the unfused
    vocab-parallel cross-entropy's (run eagerly here: dynamo off, the same arithmetic the GPU compiles)."""
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    with torch._dynamo.config.patch(disable=True):  # (monkeypatch.setattr leaves dynamo's config broken)
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(6, 2, 50, generator=gen) * 3).bfloat16()
        labels = torch.randint(0, 50, (6, 2), generator=gen)
        weight = torch.linspace(0.5, 1.5, 12).view(6, 2)
        out = {}
        for name, fn in (("unfused", lambda x: vocab_parallel_cross_entropy(x, labels)),
                         ("fused", lambda x: fused_vocab_parallel_cross_entropy(x, labels, ps.get_tensor_model_parallel_group()))):
            x = logits.clone().requires_grad_(True)
            loss = fn(x)
            (loss * weight).sum().backward()
            out[name] = (loss.detach(), x.grad)
    assert out["fused"][1].dtype == out["unfused"][1].dtype == torch.bfloat16
    assert torch.allclose(out["fused"][0], out["unfused"][0], rtol=1e-6, atol=1e-6)
    print("fused vs unfused CE, logit-gradient max abs diff:", float((out["fused"][1].float() - out["unfused"][1].float()).abs().max()))
    assert torch.equal(out["fused"][1], out["unfused"][1])
    want = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 50), labels.reshape(-1), reduction="none").view(6, 2)
    assert torch.allclose(out["fused"][0], want, rtol=1e-5, atol=1e-5)

    tiny = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "models/tiny_qwen3_next/config.json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine's config
    monkeypatch.delenv("QNEXT_FUSED", raising=False)
    cfg = hf_to_transformer_config(tiny, None, torch.float32).config
    assert cfg.cross_entropy_loss_fusion and cfg.cross_entropy_fusion_impl == "native"
    monkeypatch.setenv("QNEXT_FUSED", "0")
    assert not hf_to_transformer_config(tiny, None, torch.float32).config.cross_entropy_loss_fusion
    monkeypatch.undo()  # a CPU-only machine: megatron's unfused loss (compiling it on CPU costs more than it saves)
    assert not hf_to_transformer_config(tiny, None, torch.float32).config.cross_entropy_loss_fusion


def test_compiled_fp8_dequantization_equals_the_eager_one_bit_for_bit():
    """The frozen FP8 experts' one-pass dequantization (compiled) against the eager two-pass one and the plain
    reference: the same bf16 bits, subnormal rows and zero rows included."""
    from qnext.quant.fp8 import dequantize_rows, dequantize_rows_reference, quantize_rows

    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 40, 24, generator=g) * torch.logspace(-8, 3, 40)[None, :, None]
    w[0, :, :5] = 1e-9  # subnormal in e4m3 relative to their row
    w[1, 7] = 0.0
    q, scale = quantize_rows(w)
    got = compiled(dequantize_rows_reference, dynamic=False)(q, scale, torch.bfloat16)  # as training compiles it
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    assert torch.equal(got, dequantize_rows(q, scale, torch.bfloat16))
    assert torch.equal(compiled(dequantize_rows_reference)(q, scale, torch.bfloat16), got)  # dynamic shapes: same bits
    assert torch.equal(got, (q.float() * scale).bfloat16())
    err = (got.float() - w).abs()
    assert float((err / (w.abs() * 2.0**-3 + scale * 2.0**-9)).max()) <= 1.0  # near w, not merely self-consistent


def test_fp8_dequantize_compiles_on_cuda_only_and_follows_the_switch(monkeypatch):
    import qnext.megatron.fused as fused
    from qnext.quant import fp8
    from qnext.quant.fp8 import quantize_rows

    calls = []
    monkeypatch.setattr(fused, "compiled", lambda fn, **kw: calls.append((fn, kw)) or fn)
    q, scale = quantize_rows(torch.randn(2, 8, 16))
    fused.fp8_dequantize(q, scale, torch.bfloat16)  # CPU storage: the eager form
    assert calls == []

    class CudaLike:  # what fp8_dequantize asks of its input before choosing
        is_cuda = True

    eager = []
    monkeypatch.setattr(fp8, "dequantize_rows", lambda *a: eager.append(a) or "eager")
    monkeypatch.setattr(fused, "compiled", lambda fn, **kw: (calls.append((fn, kw)), lambda *a: "compiled")[1])
    with torch.no_grad():  # inside autograd.Function forward/backward: grad is off, still compiled
        assert fused.fp8_dequantize(CudaLike(), scale, torch.bfloat16) == "compiled"
    # per weight shape, sizes constant (2.2x the dynamic-shape kernel's speed on an H200)
    assert calls == [(fp8.dequantize_rows_reference, {"dynamic": False})] and eager == []
    monkeypatch.setenv("QNEXT_FUSED", "0")
    assert fused.fp8_dequantize(CudaLike(), scale, torch.bfloat16) == "eager"  # switched off: the eager form
