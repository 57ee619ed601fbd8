"""Inputs of megatron's linear layers with the standard strides of their shape, so that each is one GEMM.

megatron keeps activations as [s, b, h] and gets there with ``x.transpose(0, 1).contiguous()`` (the
embedding, the Gated DeltaNet's gated norm). With one packed row per micro-batch b is 1, and torch
counts a [1, s, h] tensor transposed to [s, 1, h] as contiguous already (a size-1 dimension's stride
does not matter), so ``.contiguous()`` returns it with stride s*h for the batch dimension. ``torch.matmul``
(megatron's frozen-weight linear: every LoRA base layer; its gradient-accumulating linear) folds an
N-d input into one GEMM only when its strides are the dense ones, so it ran s batched vector
products instead: 7.3 ms instead of ~0.3 ms for the 4-layer proxy's GDN ``out_proj`` of 4096 tokens
on an H200, 30% of its LoRA step (profile of 2026-12-04). A view through one dimension gives the
same memory the standard strides: no copy, no change to any value.
"""
from __future__ import annotations

import torch


def gemm_foldable(x: torch.Tensor) -> bool:
    """True when ``torch.matmul`` can treat ``x``'s leading dimensions as one (dense row-major strides,
    size-1 dimensions included)."""
    return all(x.stride(i) == x.stride(i + 1) * x.size(i + 1) for i in range(x.dim() - 1))


def standard_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a contiguous tensor whose strides are not the standard ones (a size-1
    dimension with another stride), the same memory viewed with the standard strides."""
    if t.dim() < 2 or not t.is_contiguous() or gemm_foldable(t):
        return t
    return t.view(-1).view(t.shape)


def _dense_input(_module, args):
    if args and isinstance(args[0], torch.Tensor):
        x = standard_strides(args[0])
        if x is not args[0]:
            return (x, *args[1:])
    return None


def dense_linear_inputs(model: torch.nn.Module) -> int:
    """Give every megatron Column/RowParallelLinear of ``model`` its input with standard strides (a
    forward pre-hook; a view, free). Returns how many layers got the hook."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    n = 0
    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            mod.register_forward_pre_hook(_dense_input)
            n += 1
    return n
