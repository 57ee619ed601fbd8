"""Parity of causal attention: eager (HF-style), SDPA and flex attention against a float32 reference.

Shapes follow Qwen3-Next's gated-attention layers: 16 query heads, 2 key/value heads, head dim 256
(grouped-query attention). Packed sequences use a document mask (causal inside each sequence).
The output gate and rotary embedding sit outside the kernel and are not part of the check.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .gdn import _sync, highest_precision
from .report import PERTURB_SCALE, Check, perturbed, rel_err

THRESHOLDS = {"o": 1e-2, "dq": 1.5e-2, "dk": 1.5e-2, "dv": 1.5e-2}


@dataclass(frozen=True)
class AttnCase:
    T: int
    Hq: int = 16
    Hkv: int = 2
    D: int = 256
    cu_seqlens: tuple[int, ...] | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        packed = f" packed{len(self.cu_seqlens) - 1}" if self.cu_seqlens else ""
        return f"T={self.T} Hq{self.Hq}/Hkv{self.Hkv} D{self.D}{packed} causal"


def make_inputs(case: AttnCase, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(case.seed)
    q = torch.randn(1, case.Hq, case.T, case.D, generator=gen, device=device)
    k = torch.randn(1, case.Hkv, case.T, case.D, generator=gen, device=device)
    v = torch.randn(1, case.Hkv, case.T, case.D, generator=gen, device=device)
    do = torch.randn(1, case.Hq, case.T, case.D, generator=gen, device=device)
    doc = None
    if case.cu_seqlens:
        lengths = torch.tensor(case.cu_seqlens, device=device).diff()
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), do=do.to(dtype), doc=doc)


def _bool_mask(T: int, doc: torch.Tensor | None, device) -> torch.Tensor:
    i = torch.arange(T, device=device)
    m = i[:, None] >= i[None, :]
    if doc is not None:
        m = m & (doc[:, None] == doc[None, :])
    return m


def eager(q, k, v, doc=None):
    """HF eager attention: bf16 matmuls, softmax in float32, key/value heads repeated."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~_bool_mask(q.shape[2], doc, q.device), float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return p @ v


def sdpa(q, k, v, doc=None):
    if doc is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(q.shape[2], doc, q.device), enable_gqa=True)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, doc=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if doc is None:
        def mask_mod(b, h, qi, ki):
            return qi >= ki
    else:
        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (doc[qi] == doc[ki])
    T = q.shape[2]
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention  # un-compiled flex is a slow math path (CPU tests)
    return fn(q, k, v, block_mask=block_mask, enable_gqa=True)


IMPLS: dict[str, Callable] = {"eager": eager, "sdpa": sdpa, "flex": flex}


def _run(fn, x: dict, dtype=None, perturb: bool = False):
    leaves = {n: x[n].detach().to(dtype or x[n].dtype).clone().requires_grad_(True) for n in ("q", "k", "v")}
    o = fn(leaves["q"], leaves["k"], leaves["v"], x["doc"])
    if perturb:
        o = o * (1 + PERTURB_SCALE)
    o.backward(x["do"].to(o.dtype))
    return o.detach(), {"dq": leaves["q"].grad, "dk": leaves["k"].grad, "dv": leaves["v"].grad}


def reference(x: dict):
    dtype = torch.float64 if x["q"].device.type == "cpu" else torch.float32
    with highest_precision():
        return _run(eager, x, dtype)


def check_case(case: AttnCase, impls: tuple[str, ...], device: torch.device, dtype=torch.bfloat16) -> list[Check]:
    x = make_inputs(case, device, dtype)
    ref = reference(x)
    rows = []
    for name in impls:
        t0 = time.perf_counter()
        try:
            o, grads = _run(IMPLS[name], x, perturb=perturbed("attention"))
            _sync(device)
        except Exception as err:
            rows.append(Check("attention", case.name, name, {}, dict(THRESHOLDS),
                              error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"))
            continue
        errors = {"o": rel_err(o, ref[0]), **{k: rel_err(grads[k], ref[1][k]) for k in ref[1]}}
        rows.append(Check("attention", case.name, name, errors, dict(THRESHOLDS), seconds=time.perf_counter() - t0))
    return rows
