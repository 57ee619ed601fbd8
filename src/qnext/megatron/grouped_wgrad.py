"""The grouped experts' weight gradient accumulated straight into the fp32 ``main_grad`` (full training).

Without it each micro-batch's backward writes the experts' weight gradient in bf16 (one grouped GEMM), and
megatron's DDP hook then adds it into the fp32 ``main_grad`` buffer: for the 4-layer proxy's 6.4 G expert
values per micro-batch that is 12 bytes of memory traffic per value (write 2, read 2 + 4, write 4) and, in
the profiled 16-sequence full step on an H200, 140 ms of the add alone. Here one Triton kernel computes each
expert's ``dy_e^T @ x_e`` tile in fp32 registers, adds the ``main_grad`` tile and stores it: 8 bytes per
value, and no bf16 rounding of each micro-batch's gradient (as megatron's gradient-accumulation fusion does
for its dense linears, ``compat.grad_accum``).

:class:`GroupedLinearWgradAccum` is the grouped linear with that backward; ``GroupedGemmExperts`` uses it
when the config asks for gradient accumulation fusion (``QNEXT_GRAD_ACCUM_FUSION=1``) and the weight has
DDP's ``main_grad``. Like megatron's fused linears it marks the weight ``grad_added_to_main_grad`` and hands
autograd an uninitialised gradient, which the DDP hook drops without adding.

:func:`wgrad_accum_reference` (a per-expert fp32 ``addmm_``) is the unfused form: the CPU path and the
comparison of the GPU test (``tests/gpu/test_megatron_model_gpu.py``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch ships Triton on Linux; elsewhere the reference runs
    triton = None

# output tile (out x in), rows per step of the reduction, warps, pipeline stages, and whether the main_grad tile is
# loaded before the reduction (its latency under the loop's) or after it. benchmarks/grouped_wgrad.py on an H200 at the
# proxy's ~140-160 rows per expert: this tile 3.47 / 1.73 ms for fc1 / fc2 against 4.07 / 2.10 ms for (128, 128, 32,
# 8, 3, False) and 3.94 / 2.02 ms unfused (benchmarks/results/speed_h200_2026-12-04/README.md, section 12)
TILE = (64, 64, 32, 4, 4, True)


def _group_bounds(counts: Optional[list[int]], offsets: Optional[torch.Tensor]) -> list[int]:
    ends = offsets.tolist() if counts is None else torch.tensor(counts).cumsum(0).tolist()
    return [0, *ends]


def wgrad_accum_reference(x: torch.Tensor, dy: torch.Tensor, counts: Optional[list[int]],
                          offsets: Optional[torch.Tensor], main_grad: torch.Tensor) -> None:
    """``main_grad[e] += dy_e^T @ x_e`` for the rows of each expert, the product in ``main_grad``'s dtype."""
    b = _group_bounds(counts, offsets)
    for e in range(main_grad.shape[0]):
        if b[e + 1] > b[e]:
            main_grad[e].addmm_(dy[b[e]:b[e + 1]].t().to(main_grad.dtype), x[b[e]:b[e + 1]].to(main_grad.dtype))


if triton is not None:
    @triton.jit
    def _wgrad_accum_kernel(x_ptr, dy_ptr, ends_ptr, g_ptr, N, K, stride_x, stride_dy,
                            BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, PRELOAD: tl.constexpr):
        e = tl.program_id(1)
        tiles_k = tl.cdiv(K, BK)
        pn, pk = tl.program_id(0) // tiles_k, tl.program_id(0) % tiles_k
        end = tl.load(ends_ptr + e).to(tl.int64)
        start = tl.where(e > 0, tl.load(ends_ptr + tl.maximum(e - 1, 0)), 0).to(tl.int64)
        if end > start:  # an expert without tokens leaves its gradient as it is
            offs_n = pn * BN + tl.arange(0, BN)
            offs_k = pk * BK + tl.arange(0, BK)
            tile = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            g = g_ptr + e.to(tl.int64) * N * K + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
            if PRELOAD:
                acc = tl.load(g, mask=tile, other=0.0)
            else:
                acc = tl.zeros((BN, BK), dtype=tl.float32)
            for t in range(start, end, BT):
                rows = t + tl.arange(0, BT)
                live = rows < end
                dy = tl.load(dy_ptr + rows[:, None] * stride_dy + offs_n[None, :],
                             mask=live[:, None] & (offs_n[None, :] < N), other=0.0)
                xx = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :],
                             mask=live[:, None] & (offs_k[None, :] < K), other=0.0)
                acc += tl.dot(tl.trans(dy), xx)
            if not PRELOAD:
                acc += tl.load(g, mask=tile, other=0.0)
            tl.store(g, acc, mask=tile)


def kernel_applies(x: torch.Tensor, dy: torch.Tensor, main_grad: torch.Tensor, offsets) -> bool:
    return (triton is not None and x.is_cuda and offsets is not None and x.dtype == dy.dtype == torch.bfloat16
            and main_grad.dtype == torch.float32 and main_grad.is_contiguous())


def wgrad_accum(x: torch.Tensor, dy: torch.Tensor, counts: Optional[list[int]], offsets: Optional[torch.Tensor],
                main_grad: torch.Tensor, tile: tuple = TILE) -> None:
    """``main_grad[e] += dy_e^T @ x_e`` (rows of expert ``e`` end at ``offsets[e]``, or ``counts``): the Triton
    kernel for bf16 CUDA tensors with GPU offsets, :func:`wgrad_accum_reference` otherwise."""
    if not kernel_applies(x, dy, main_grad, offsets):
        return wgrad_accum_reference(x, dy, counts, offsets, main_grad)
    x, dy = x.contiguous(), dy.contiguous()  # (no copy for the tensors the experts save: already row-major)
    experts, n, k = main_grad.shape
    bn, bk, bt, warps, stages, preload = tile
    grid = (triton.cdiv(n, bn) * triton.cdiv(k, bk), experts)
    _wgrad_accum_kernel[grid](x, dy, offsets, main_grad, n, k, x.stride(0), dy.stride(0),
                              BN=bn, BK=bk, BT=bt, PRELOAD=preload, num_warps=warps, num_stages=stages)


class GroupedLinearWgradAccum(torch.autograd.Function):
    """``grouped(x, weight, counts, offsets)`` whose backward accumulates the weight gradient into
    ``weight.main_grad`` (fp32) instead of returning it."""

    @staticmethod
    def forward(ctx, x, weight, grouped: Callable, counts: Optional[list[int]], offsets: Optional[torch.Tensor]):
        ctx.save_for_backward(x, weight)
        # the parameter itself, for its main_grad and flag: under saved-tensor hooks (qnext.megatron.regather, a
        # non-reentrant checkpoint) the saved weight comes back as a plain tensor without those attributes
        ctx.param = weight
        ctx.grouped, ctx.counts, ctx.offsets = grouped, counts, offsets
        return grouped(x, weight, counts, offsets)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        param = ctx.param
        grad = grad.contiguous()
        dx = ctx.grouped(grad, weight.transpose(-2, -1), ctx.counts, ctx.offsets) if ctx.needs_input_grad[0] else None
        wgrad_accum(x, grad, ctx.counts, ctx.offsets, param.main_grad)
        # megatron's convention for fused weight gradients (tensor_parallel.layers): the DDP hook sees the flag and
        # drops the uninitialised gradient (allocated, never written) without adding it
        param.grad_added_to_main_grad = True
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device, requires_grad=False)
        return dx, dw, None, None, None


def fused_wgrad_applies(weight: torch.Tensor) -> bool:
    """Whether the weight is trained under megatron's DDP (an fp32 ``main_grad`` and the hook's flag)."""
    main = getattr(weight, "main_grad", None)
    return (weight.requires_grad and torch.is_grad_enabled() and main is not None and main.dtype == torch.float32
            and hasattr(weight, "grad_added_to_main_grad"))
