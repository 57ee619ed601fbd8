"""Fused elementwise ops of the TE-free stack, each next to the plain function it replaces.

Transformer Engine fuses these into its own kernels; without it, each would be several passes over
memory (a float32 copy, a product, a cast, and the same again in backward). Here ``torch.compile``
generates one kernel per direction from the plain definition, so the arithmetic is the reference's:

- :func:`swiglu_probs`: silu(gate) * up * routing probability of the routed experts, in float32,
  rounded once to the tokens' dtype;
- :func:`rms_norm`: x / rms(x) * (1 + w) (zero-centred) or * w, in float32, rounded once;
- :func:`fp8_dequantize`: frozen FP8 expert weights times their row scales, rounded once to bf16
  (``qnext.quant.fp8.dequantize_rows_reference``): one pass reading 1 byte and writing 2 per value, where the
  eager form (``qnext.quant.fp8.dequantize_rows``) moves 7; it runs twice per layer and step (forward and
  input gradient) over every expert of the layer;
- the language-model cross-entropy split over TP ranks: megatron-core's ``native`` fused implementation
  (``cross_entropy_loss_fusion``, set in ``qnext.megatron.config``; its pieces are compiled by megatron's
  ``jit_fuser``), against its unfused ``vocab_parallel_cross_entropy``. With the whole vocabulary on one
  rank, fla's fused kernel takes the loss whatever this switch says (``qnext.megatron.lm_loss``,
  ``QNEXT_FLA_LOSS``).

The compiled norms and SwiGLU run on CUDA tensors under autograd (the FP8 dequantization in any grad mode);
all are on by default (``QNEXT_FUSED=0`` turns them off:
on one H200 the proxy's LoRA step took 0.088 s with them and 0.102 s without, and they pass the GPU
fast-path test); CPU tensors and evaluation take the reference. ``tests/unit/test_fused_ops.py`` compares compiled and reference forms, values
and gradients, on the CPU (where inductor compiles C++).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from .switches import switch_on

ENV = "QNEXT_FUSED"


def fused_enabled() -> bool:
    """On unless ``QNEXT_FUSED=0`` (checked in a GPU training step,
    ``tests/gpu/test_megatron_model_gpu.py::test_fast_paths_match_the_reference_paths``, and timed on and off:
    ``benchmarks/results/speed_h200_2026-12-04/4_micro_batch/``)."""
    return switch_on(ENV, True)


# ------------------------------------------------------------------------------------------ reference
def swiglu_probs_reference(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """h = [gate | up] (last dim 2F), probs [N] -> silu(gate) * up * probs, [N, F] in h's dtype."""
    gate, up = torch.chunk(h.float(), 2, dim=-1)
    return (F.silu(gate) * up * probs.float().unsqueeze(-1)).to(h.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float()
    y = y * (1.0 + w) if zero_centered else y * w
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------ compiled
# Each norm call site varies in ways dynamo guards on (zero-centred or not, eps, input rank and dtype,
# whether the weight trains): full training of the 4-layer proxy needed more than dynamo's default 8 graphs
# for rms_norm_reference and then raised (fullgraph=True) at the held-out evaluation. Room for every variant:
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, backend: str = "inductor", dynamic: bool = True) -> Callable:
    """``torch.compile(fn)`` once per function. ``dynamic`` (the default) for ops whose token count changes per
    layer and batch; ``dynamic=False`` compiles each shape with its sizes as constants (for weights: a few fixed
    shapes per model)."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=dynamic, fullgraph=True, backend=backend)


def _use_compiled(x: torch.Tensor) -> bool:
    """CUDA tensors under autograd: evaluation (no_grad) takes the reference, so that it adds no graphs."""
    return x.is_cuda and torch.is_grad_enabled() and fused_enabled()


def swiglu_probs(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    fn = compiled(swiglu_probs_reference) if _use_compiled(h) else swiglu_probs_reference
    return fn(h, probs)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    fn = compiled(rms_norm_reference) if _use_compiled(x) else rms_norm_reference
    return fn(x, weight, eps, zero_centered)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (values identical to ``qnext.quant.fp8.dequantize_rows``). Compiled on CUDA
    in any grad mode: it is called inside the quantized grouped linear's forward and backward, where autograd
    is off, and both need it. Compiled per weight shape (fc1's and fc2's: two graphs per model), sizes constant:
    on an H200 0.97 ms for the 80B config's fc1 against 2.12 ms compiled for dynamic shapes (3.31 vs 1.52 TB/s,
    ``benchmarks/fp8_dequant.py``)."""
    from ..quant.fp8 import dequantize_rows, dequantize_rows_reference

    if q.is_cuda and fused_enabled():
        return compiled(dequantize_rows_reference, dynamic=False)(q, scale, dtype)
    return dequantize_rows(q, scale, dtype)
