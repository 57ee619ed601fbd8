"""The grouped linear over frozen quantized expert weights (FP8 or NF4), input gradient only.

``quantized_grouped_linear(x, dequantize, grouped, counts, offsets)`` is ``grouped(x, dequantize(x.dtype),
counts, offsets)`` (rows of ``x`` grouped by expert times each expert's weight), but autograd keeps no
dequantized weight between forward and backward: backward dequantizes again for the input gradient. So
between the two passes only the quantized storage stays in memory (autograd would otherwise keep every
layer's bf16 copy alive until its backward), and at any time at most one layer's weights exist in bf16.
The frozen weights get no gradient.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class _QuantizedGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dequantize: Callable, grouped: Callable, counts: Optional[list[int]],
                offsets: Optional[torch.Tensor]):
        ctx.dequantize, ctx.grouped, ctx.counts, ctx.offsets = dequantize, grouped, counts, offsets
        return grouped(x, dequantize(x.dtype), counts, offsets)

    @staticmethod
    def backward(ctx, grad):
        # [E, in, out] as a view: grouped_linear transposes it back, so the GEMM reads the dequantized
        # weight row-major as it is (no transposed copy of the layer's experts)
        w_t = ctx.dequantize(grad.dtype).transpose(-2, -1)
        return ctx.grouped(grad, w_t, ctx.counts, ctx.offsets), None, None, None, None


def quantized_grouped_linear(x: torch.Tensor, dequantize: Callable[[torch.dtype], torch.Tensor], grouped: Callable,
                             counts: Optional[list[int]], offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grouped(x, weight, counts, offsets)`` with ``weight = dequantize(dtype)`` made afresh in each pass."""
    return _QuantizedGroupedLinear.apply(x, dequantize, grouped, counts, offsets)
