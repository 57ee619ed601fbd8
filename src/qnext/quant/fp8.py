"""FP8 (e4m3) frozen routed-expert weights for LoRA: half the bytes of bf16, dequantized per layer just in
time for the grouped GEMM.

Qwen3-Next-80B-A3B's routed experts are 77.3 B of its 79.7 B parameters; in bf16 they alone are 155 GB,
in e4m3 with one fp32 scale per output row 77 GB, which fits one H200 next to the rest of the model.

- :func:`quantize_rows`: one scale per row (per expert and output feature), ``amax / 448`` (448 is
  e4m3's largest finite value), so every row uses the format's whole range.
- :func:`dequantize_rows`: ``q * scale`` in the compute dtype.
- Error bound (:func:`error_bound`): e4m3 keeps 3 mantissa bits, so a normal value is off by at most
  half a step, 2^-4 of itself; values below e4m3's smallest normal (2^-6 x scale) sit on its subnormal
  grid of spacing 2^-9 x scale, off by at most 2^-10 x scale.
- the grouped GEMM over the experts dequantizes in each pass (``qnext.quant.grouped``), so only the FP8
  weights stay in memory between forward and backward; the frozen weights get no gradient. On CUDA the
  experts take :func:`dequantize_rows_reference` compiled into one kernel
  (``qnext.megatron.fused.fp8_dequantize``, the same bits); elsewhere :func:`dequantize_rows`.

The reference is the bf16 computation with the dequantized weights (``tests/unit/test_quant_fp8.py``
compares them exactly, and the quantized model's LoRA logits and gradients with the bf16 model's within
a tolerance derived from the bound).
"""
from __future__ import annotations

from typing import Optional

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_NORMAL_REL = 2.0**-4  # half a step of a 3-bit mantissa, relative
_SUBNORMAL_ABS = 2.0**-10  # half the subnormal spacing 2^-9, in units of the row scale


CHUNK_VALUES = 1 << 26  # values quantized at a time: ~1 GiB of fp32 scratch, not 4x a whole layer's bf16 bytes


def quantize_rows(w: torch.Tensor, out: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [..., out, in] -> (e4m3 values of the same shape, fp32 scales [..., out, 1]), written into
    ``out`` when given. Rows are independent, so they are quantized a chunk at a time (``CHUNK_VALUES``):
    the fp32 temporaries of one chunk, not of the whole tensor (a layer of the 80B model's experts is 1.6 B
    values: 19 GB of fp32 scratch at once)."""
    q, scale = out if out is not None else (
        torch.empty(w.shape, dtype=FP8, device=w.device),
        torch.empty(*w.shape[:-1], 1, dtype=torch.float32, device=w.device))
    rows = w.reshape(-1, w.shape[-1])
    q_rows, s_rows = q.view(-1, w.shape[-1]), scale.view(-1, 1)
    for part in _row_chunks(rows):
        wf = rows[part].float()
        amax = wf.abs().amax(dim=-1, keepdim=True)
        sc = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q_rows[part] = (wf / sc).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        s_rows[part] = sc
    return q, scale


def _row_chunks(rows: torch.Tensor):
    """Slices of ``rows`` [n, in] of at most ``CHUNK_VALUES`` values (at least one row each)."""
    step = max(1, CHUNK_VALUES // max(1, rows.shape[-1]))
    return (slice(a, a + step) for a in range(0, rows.shape[0], step))


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q * scale`` rounded once into ``dtype``: the values of :func:`dequantize_rows_reference`, in two
    passes over the weights instead of three (e4m3 -> bf16 is exact: bf16 has e4m3's exponent range and more
    mantissa bits; the product is formed in fp32 and written as ``dtype``): 7 bytes moved per value, not 19."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    q_rows, s_rows, o_rows = q.view(-1, q.shape[-1]), scale.view(-1, 1), out.view(-1, q.shape[-1])
    for part in _row_chunks(q_rows):  # the bf16 copy of q exists one chunk at a time
        torch.mul(q_rows[part].to(torch.bfloat16), s_rows[part], out=o_rows[part])
    return out


def dequantize_rows_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The plain computation: fp32 values times fp32 scales, cast to ``dtype``."""
    return (q.float() * scale).to(dtype)


def error_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |w - dequantize(quantize(w))| (fp32, before the cast to the compute dtype)."""
    return torch.maximum(_NORMAL_REL * w.float().abs(), _SUBNORMAL_ABS * scale.expand_as(w))
