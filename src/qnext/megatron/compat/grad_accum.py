"""Gradient accumulation fusion without Apex: the weight gradient of megatron's parallel linears
written straight into the fp32 ``main_grad`` buffer.

megatron-core 0.19.2's TE-free linears (``tensor_parallel.layers``) fuse the weight-gradient GEMM with
the accumulation into ``main_grad`` only through Apex's ``fused_weight_gradient_mlp_cuda`` extension
(a CUDA source build); without it they compute a bf16 gradient, which megatron's DDP hook then adds
into the fp32 buffer (``main_grad.add_``: 52 ms of a 451 ms full step of the 4-layer proxy on an
H200, FINDINGS.md), rounding each micro-batch's gradient to bf16 on the way.

:mod:`torch` 2.11 has the same operation: ``torch.addmm(main_grad, a, b, out_dtype=torch.float32,
out=main_grad)`` adds the product of bf16 matrices to an fp32 matrix in one GEMM (CUDA only; on the CPU the
dtype variant does not exist). This module is a
stand-in for the extension with that call (and a plain fp32 ``addmm_`` where the dtype variant does not
exist, the reference and the CPU path), registered under the extension's name before megatron imports
it. ``QNEXT_GRAD_ACCUM_FUSION=1`` turns it on (opt-in until its GPU test,
``tests/gpu/test_megatron_model_gpu.py::test_grad_accum_fusion_matches_the_unfused_gradient``, has
passed); qnext's grouped experts accumulate theirs with a kernel of their own (``qnext.megatron.grouped_wgrad``)
under the same switch, and the LoRA adapters keep the unfused path.
"""
from __future__ import annotations

import sys
import types

import torch

from ..switches import switch_on

ENV = "QNEXT_GRAD_ACCUM_FUSION"
MODULE = "fused_weight_gradient_mlp_cuda"


def enabled() -> bool:
    return switch_on(ENV, False)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def wgrad_accum_reference(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` with the product in ``main_grad``'s dtype (unfused)."""
    g, x = _flat(grad_output), _flat(total_input)
    main_grad.addmm_(g.t().to(main_grad.dtype), x.to(main_grad.dtype))


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """Apex's signature: the bf16/fp16 product accumulated in fp32 into ``main_grad`` by one GEMM."""
    g, x = _flat(grad_output), _flat(total_input)
    if main_grad.is_cuda and g.dtype in (torch.bfloat16, torch.float16) and x.dtype == g.dtype:
        torch.addmm(main_grad, g.t(), x, out_dtype=torch.float32, out=main_grad)
    else:
        wgrad_accum_reference(total_input, grad_output, main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """Apex's signature for a bf16/fp16 ``main_grad``: a same-dtype ``addmm_``."""
    main_grad.addmm_(_flat(grad_output).t(), _flat(total_input))


def stand_in() -> types.ModuleType:
    mod = types.ModuleType(MODULE, "qnext's torch stand-in for Apex's fused_weight_gradient_mlp_cuda")
    mod.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    mod.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    mod.__qnext_stand_in__ = True
    return mod


def install_grad_accum_fusion() -> bool:
    """Make megatron's linears find the stand-in (unless Apex's extension is installed). Idempotent;
    returns whether fusion is available to them. The model config must also ask for it
    (``gradient_accumulation_fusion=True``; ``qnext.megatron.provider`` does when :func:`enabled`)."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401  (Apex's own extension wins)
    except ImportError:
        sys.modules[MODULE] = stand_in()
    from megatron.core.tensor_parallel import layers

    if not getattr(layers, "_grad_accum_fusion_available", False):
        layers.fused_weight_gradient_mlp_cuda = sys.modules[MODULE]
        layers._grad_accum_fusion_available = True
    return True
