"""NF4 (4-bit NormalFloat, as in QLoRA) frozen routed-expert weights, held by torchao's ``NF4Tensor``.

Qwen3-Next-80B-A3B's routed experts (77.3 B values) take 155 GB in bf16, 77 GB in FP8 and about 40 GB in
NF4: 4 bits per value, one int8 scale per block of 64 values (``BLOCK``) and, for every 256 such scales
(``SCALER_BLOCK``), one fp32 factor (QLoRA's "double quantization"). So the whole model's LoRA fits one
80 GB GPU.

The format and its arithmetic are torchao's (an optional dependency: ``pip install torchao``); this module
only lays a stacked [E, out, in] expert weight out as NF4 tensors of whole experts (``Nf4Stack``), at most
``CHUNK_VALUES`` values each, so quantizing or dequantizing one needs a bounded amount of scratch memory
(torchao's dequantization widens the 4-bit codes to int64 first), and dequantizes them one layer at a time
for the grouped GEMM (``qnext.quant.grouped.quantized_grouped_linear``).

Error bound (:func:`error_bound`): each value is ``s * u`` with ``s`` its block's absolute maximum and
``|u| <= 1``; ``u`` is rounded to the nearest of 16 codes (off by at most half the widest gap between
neighbouring codes, 0.1385, times ``s``), and ``s`` itself is stored as int8 relative to the mean of all
scales, in steps of ``d / 128`` where ``d`` is the largest deviation from that mean in its group of 256
(off by at most one step: the top value is clamped to 127). Plus the input dtype's rounding of ``u``
(2^-7 of ``s`` covers bf16).
"""
from __future__ import annotations

from typing import Optional

import torch

BLOCK = 64  # values per absmax scale (QLoRA's block size)
SCALER_BLOCK = 256  # scales per fp32 factor of the second quantization
CHUNK_VALUES = 1 << 26  # values per NF4 tensor: quantizing/dequantizing one takes ~1-2 GB of scratch
BYTES_PER_VALUE = 0.5 + 1 / BLOCK + 4 / (BLOCK * SCALER_BLOCK)  # 4 bits, an int8 scale, a share of an fp32 factor
_ROUNDING = 2.0**-7  # the input dtype's rounding of the normalized value (bf16: 2^-8 relative), generous


def _torchao():
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError as e:  # optional dependency
        from ..errors import UserError

        raise UserError(f"train.lora.base_dtype=nf4 needs torchao, which is not importable ({e})",
                        hint="pip install 'torchao==0.18.0' (or `pip install -e '.[quant]'`), or use base_dtype=fp8 "
                             "(no extra dependency) or bf16") from None
    return NF4Tensor, to_nf4


def available() -> bool:
    try:
        _torchao()
    except Exception:
        return False
    return True


def codebook() -> torch.Tensor:
    """The 16 NF4 codes (torchao's, the QLoRA paper's rounded to 4 decimals), fp32."""
    NF4Tensor, to_nf4 = _torchao()
    return to_nf4(torch.zeros(BLOCK * SCALER_BLOCK), BLOCK, SCALER_BLOCK).nf4.float()


def half_gap() -> float:
    """Half the widest gap between neighbouring codes: the rounding error of a normalized value."""
    c = codebook().sort().values
    return float((c[1:] - c[:-1]).max()) / 2


def require(out_features: int, in_features: int) -> None:
    """torchao importable and each expert's values a whole number of blocks; else one clear error."""
    _torchao()
    if (out_features * in_features) % BLOCK:
        raise ValueError(f"NF4 expert storage needs out*in divisible by {BLOCK}, got {out_features}x{in_features}")


def _experts_per_chunk(shape) -> int:
    """Whole experts per NF4 tensor: as many as fit ``CHUNK_VALUES``, at least one."""
    e, o, i = shape
    return max(1, min(e, CHUNK_VALUES // (o * i)))


def _scaler_block(n_blocks: int) -> int:
    """SCALER_BLOCK, or (small test models) the largest power of two dividing the number of blocks."""
    if n_blocks % SCALER_BLOCK == 0:
        return SCALER_BLOCK
    return n_blocks & -n_blocks


class Nf4Stack:
    """A frozen stacked weight [E, out, in] as NF4 tensors of whole experts."""

    def __init__(self, shape: tuple[int, int, int], chunks: list, experts_per_chunk: int, dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.chunks = chunks
        self.experts_per_chunk = experts_per_chunk
        self.dtype = dtype  # the dtype it was quantized from and dequantizes to by default

    @classmethod
    @torch.no_grad()
    def quantize(cls, w: torch.Tensor) -> "Nf4Stack":
        """``w`` [E, out, in] (bf16 for real runs) -> NF4, one chunk of whole experts at a time."""
        e, o, i = w.shape
        require(o, i)
        _, to_nf4 = _torchao()
        k = _experts_per_chunk(w.shape)
        chunks = []
        for a in range(0, e, k):
            part = w[a:a + k].reshape(-1, i).contiguous()
            chunks.append(to_nf4(part, BLOCK, _scaler_block(part.numel() // BLOCK)))
        return cls((e, o, i), chunks, k, w.dtype)

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None,
                   reference: bool = False) -> torch.Tensor:
        """The weight in ``dtype``. Each byte holds two codes, so one lookup in a 256-entry table of code
        pairs decodes both (:func:`_decode`); ``reference=True`` takes torchao's own
        ``get_original_weight`` (both 4-bit halves widened to int64 and looked up apart), which gives the
        same bits (``tests/unit/test_quant_nf4.py``) with about three times the memory traffic."""
        dtype = dtype or self.dtype
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        k = self.experts_per_chunk
        for j, chunk in enumerate(self.chunks):
            part = out[j * k:(j + 1) * k]
            part.copy_((chunk.get_original_weight() if reference else _decode(chunk)).view(part.shape))
        return out

    @property
    def device(self) -> torch.device:
        return self.chunks[0].quantized_data.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.chunks
                   for t in (c.quantized_data, c.quantized_scalers, c.quantization_factor))

    def to(self, device) -> "Nf4Stack":
        if torch.device(device) == self.device:
            return self
        NF4Tensor, _ = _torchao()
        # NF4Tensor's own .to() dequantizes; move the inner tensors and rebuild through its flatten protocol
        import dataclasses

        moved = []
        for c in self.chunks:
            names, meta = c.__tensor_flatten__()
            inner = {n: getattr(c, n).to(device) for n in names}
            # the wrapper's own metadata says where it lives: the new device, not the old one
            meta = dict(meta, tensor_meta=dataclasses.replace(meta["tensor_meta"], device=inner[names[0]].device))
            moved.append(NF4Tensor.__tensor_unflatten__(inner, meta, c.shape, c.stride()))
        return Nf4Stack(tuple(self.shape), moved, self.experts_per_chunk, self.dtype)


def _decode(c) -> torch.Tensor:
    """torchao's NF4 tensor ``c`` in its own dtype, from its stored fields: the block scales dequantized by
    torchao, the codes of each byte (high nibble first) from one table of the 256 code pairs, each block
    times its scale in ``c``'s dtype (the rounding torchao's decoding does)."""
    scales = c.dequantize_scalers(c.quantized_scalers, c.quantization_factor, c.scaler_block_size)
    codes = c.nf4
    pairs = torch.stack((codes.repeat_interleave(16), codes.repeat(16)), dim=1)  # byte b -> (codes[b >> 4], codes[b & 15])
    values = pairs.index_select(0, c.quantized_data.int()).view(-1, c.block_size)
    return (values * scales.view(-1, 1)).view(c.shape)


@torch.no_grad()
def error_bound(w: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |w - dequantize(quantize(w))| for the stacked weight ``w`` [E, out, in] (fp32),
    computed from ``w``'s own block maxima as the module docstring derives it."""
    e = w.shape[0]
    k = _experts_per_chunk(w.shape)
    h = half_gap()
    bounds = []
    for a in range(0, e, k):
        part = w[a:a + k].float().reshape(-1)
        s = part.view(-1, BLOCK).abs().amax(dim=1)
        g = _scaler_block(s.numel())
        dev = (s - s.mean()).view(-1, g).abs().amax(dim=1, keepdim=True).expand(-1, g).reshape(-1)
        per_block = (h + _ROUNDING) * s + dev / 128
        bounds.append(per_block[:, None].expand(-1, BLOCK).reshape(w[a:a + k].shape))
    return torch.cat(bounds, dim=0)


__all__ = ["BLOCK", "BYTES_PER_VALUE", "SCALER_BLOCK", "Nf4Stack", "available", "codebook", "error_bound",
           "half_gap", "require"]
