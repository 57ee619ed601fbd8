"""Gradient accumulation fusion without Apex (qnext.megatron.compat.grad_accum): megatron-core's own
parallel linears and DDP, two micro-batches accumulated into the fp32 main_grad buffer, with the fusion
(its stand-in for Apex's extension) against megatron's unfused path (a weight gradient per micro-batch,
added by the DDP hook). On CPU the stand-in runs its fp32 reference product; the CUDA ``addmm`` with
``out_dtype`` is compared on a GPU by tests/gpu/test_megatron_model_gpu.py."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def world():
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    yield


def _grads(fused: bool, calls: list) -> dict[str, torch.Tensor]:
    from dist_fixtures import ddp_mlp
    from megatron.core.tensor_parallel import layers

    from qnext.megatron.compat.cpu import cpu_training
    from qnext.megatron.compat.grad_accum import install_grad_accum_fusion

    if fused:
        assert install_grad_accum_fusion() and layers._grad_accum_fusion_available
        stand_in = layers.fused_weight_gradient_mlp_cuda
        original = stand_in.wgrad_gemm_accum_fp32
        stand_in.wgrad_gemm_accum_fp32 = lambda *a: calls.append(a[2].shape) or original(*a)
    model, ddp = ddp_mlp(torch.float32, gradient_accumulation_fusion=fused)
    ddp.zero_grad_buffer()
    gen = torch.Generator().manual_seed(1)
    try:
        with cpu_training():
            for _ in range(2):  # two micro-batches accumulate into main_grad
                x = torch.randn(16, 2, 32, generator=gen)
                (ddp(x).float() ** 2).sum().backward()
    finally:
        if fused:
            stand_in.wgrad_gemm_accum_fp32 = original
    return {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}


def test_fused_accumulation_equals_megatrons_unfused_path(world):
    calls: list = []
    plain = _grads(False, calls)
    assert not calls
    fused = _grads(True, calls)
    assert sorted(map(tuple, calls)) == sorted([(48, 32), (32, 48)] * 2)  # each weight, each micro-batch
    for name, g in plain.items():
        assert float(g.norm()) > 0
        rel = float((fused[name] - g).norm() / g.norm())
        assert rel < 1e-6, (name, rel)


def test_the_stand_in_reference_accumulates_the_product():
    from qnext.megatron.compat.grad_accum import wgrad_accum_reference, wgrad_gemm_accum_fp32

    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 3, 4, generator=gen)
    start = torch.randn(4, 8, generator=gen)
    for fn in (wgrad_accum_reference, wgrad_gemm_accum_fp32):
        acc = start.clone()
        fn(x.bfloat16(), g.bfloat16(), acc)
        want = start + g.bfloat16().float().reshape(-1, 4).t() @ x.bfloat16().float().reshape(-1, 8)
        assert acc.dtype == torch.float32 and torch.allclose(acc, want, rtol=1e-6, atol=1e-5)
