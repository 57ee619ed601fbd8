"""Packed rows (several chats in one sequence) for transformers' Qwen3-Next: every chat stays apart.

transformers 5.17 keeps packed chats apart in its attention layers when it gets ``position_ids`` and
no ``attention_mask`` (it derives a block-diagonal mask from where the positions restart). Its Gated
DeltaNet layers do not: they hand ``cu_seq_lens_q`` to the short convolution and ``cu_seqlens`` to the
delta rule through ``**kwargs``, and the torch fallbacks (``causal_conv1d_fn``,
``torch_chunk_gated_delta_rule``) ignore them, so the recurrent state and the 4-tap convolution window
run from one chat into the next. The causal-conv1d package's kernel takes ``seq_idx``, not
``cu_seqlens``, so on GPUs the convolution leaks the same way. Upstream: transformers issue #46093;
peers shipped the same bug (slime PR #1686, ms-swift issue #7981).

:func:`install` rebinds those two names of ``modeling_qwen3_next`` -- this is the one place the model's
functions are patched -- to wrappers that honour the boundaries when ``cu_seqlens`` is given and
call what was bound before otherwise:

- short convolution: fla's varlen ``causal_conv1d`` for CUDA tensors when fla imports; else
  :func:`conv1d_varlen_reference`, the depthwise convolution written as K shifted products in
  which every tap reaching into an earlier segment is dropped (no host sync);
- delta rule: fla's ``chunk_gated_delta_rule`` with ``cu_seqlens`` for CUDA tensors (the batch is
  flattened to one row, as fla requires); else the torch reference run once per segment
  (:func:`gated_delta_rule_per_segment`, which reads the boundaries on the host: CPU path).

``cu_seqlens`` covers the flattened ``[B*L]`` token stream and every row boundary is a segment
boundary (``qnext.data.collate`` builds it so: each chat, then each row's padding tail).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

CONV_NAME = "causal_conv1d_fn"
GDN_NAME = "torch_chunk_gated_delta_rule"


def _modeling():
    from transformers.models.qwen3_next import modeling_qwen3_next

    return modeling_qwen3_next


def segment_ids(cu_seqlens: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """[n] index of the segment each token of the flattened stream belongs to (on the GPU, no sync)."""
    pos = torch.arange(n, device=device, dtype=torch.long)
    return torch.bucketize(pos, cu_seqlens.to(device=device, dtype=torch.long)[1:], right=True)


def conv1d_varlen_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            activation: str | None, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution of ``x`` [B, D, L] (transformers' layout), ``weight`` [D, K], that
    never mixes tokens of two segments: out[t] = sum_j w[K-1-j] * x[t-j] over taps in t's segment."""
    from transformers.activations import ACT2FN

    b, d, length = x.shape
    n = b * length
    k = weight.shape[-1]
    xf = x.to(weight.dtype).permute(1, 0, 2).reshape(d, n)
    seg = segment_ids(cu_seqlens, n, x.device)
    out = xf * weight[:, k - 1:k]
    for j in range(1, k):
        shifted = F.pad(xf, (j, 0))[:, :n]
        same = (F.pad(seg, (j, 0), value=-1)[:n] == seg).to(xf.dtype)
        out = out + shifted * same * weight[:, k - 1 - j:k - j]
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.reshape(d, b, length).permute(1, 0, 2).to(x.dtype)


def _fla_conv() -> Callable | None:
    try:
        from fla.modules.causal_conv1d import causal_conv1d
    except Exception:  # fla missing or broken: the torch reference runs instead
        return None
    return causal_conv1d


def _fla_gdn() -> Callable | None:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:
        return None
    return chunk_gated_delta_rule


def conv1d_varlen(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                  cu_seqlens: torch.Tensor) -> torch.Tensor:
    fla_conv = _fla_conv() if x.is_cuda else None
    if fla_conv is None:
        return conv1d_varlen_reference(x, weight, bias, activation, cu_seqlens)
    b, d, length = x.shape
    flat = x.transpose(1, 2).reshape(1, b * length, d)
    y, _ = fla_conv(flat, weight=weight, bias=bias, activation=activation, cu_seqlens=cu_seqlens.long())
    return y.reshape(b, length, d).transpose(1, 2)


def gated_delta_rule_per_segment(reference: Callable, query, key, value, g, beta, cu_seqlens: torch.Tensor,
                                 **kwargs: Any) -> torch.Tensor:
    """The torch delta rule run on each segment of the flattened batch alone (state starts at zero)."""
    b, length = query.shape[:2]
    flat = [t.reshape(1, b * length, *t.shape[2:]) for t in (query, key, value, g, beta)]
    bounds = cu_seqlens.tolist()  # host sync: the CPU reference path only
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            q, k, v, gg, bb = (t[:, start:end] for t in flat)
            outs.append(reference(q, k, v, g=gg, beta=bb, initial_state=None, output_final_state=False, **kwargs)[0])
    return torch.cat(outs, dim=1).reshape(b, length, *value.shape[2:])


class _PackedBinding:
    """A module-level kernel name of ``modeling_qwen3_next`` that honours ``cu_seqlens``.

    ``previous`` is what the name was bound to before (fla's kernel, or transformers' torch
    reference after ``qnext.models.hf.force_torch_gdn_path``); calls without boundaries go there.
    """

    qnext_packed = True

    def __init__(self, name: str, previous: Callable):
        self.name, self.previous = name, previous

    def __repr__(self) -> str:
        return f"<qnext packed-sequence wrapper of {self.name} around {self.previous!r}>"


class _PackedConv(_PackedBinding):
    def __call__(self, hidden_states, weight, bias=None, activation=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            return self.previous(hidden_states, weight, bias, activation=activation, **kwargs)
        return conv1d_varlen(hidden_states, weight, bias, activation, cu)


class _PackedDeltaRule(_PackedBinding):
    def __call__(self, query, key, value, g, beta, **kwargs):
        cu_seqlens = kwargs.get("cu_seqlens")
        if cu_seqlens is None:
            return self.previous(query, key, value, g=g, beta=beta, **kwargs)
        if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
            raise ValueError("packed rows (cu_seqlens) carry no recurrent state in or out: call the model with use_cache=False")
        l2norm = bool(kwargs.get("use_qk_l2norm_in_kernel", False))
        fla_gdn = _fla_gdn() if query.is_cuda else None
        if fla_gdn is not None:
            b, length = query.shape[:2]
            flat = [t.reshape(1, b * length, *t.shape[2:]) for t in (query, key, value, g, beta)]
            out, _ = fla_gdn(*flat, use_qk_l2norm_in_kernel=l2norm, cu_seqlens=cu_seqlens.long())
            return out.reshape(b, length, *value.shape[2:]), None
        reference = inspect.unwrap(self.previous)
        out = gated_delta_rule_per_segment(reference, query, key, value, g, beta, cu_seqlens,
                                           chunk_size=kwargs.get("chunk_size", 64), use_qk_l2norm_in_kernel=l2norm)
        return out, None


def is_packed_binding(fn: Any) -> bool:
    return bool(getattr(fn, "qnext_packed", False))


def install() -> bool:
    """Bind the packed-aware wrappers into transformers' Qwen3-Next (idempotent). True if newly bound."""
    mod = _modeling()
    changed = False
    for name, cls in ((CONV_NAME, _PackedConv), (GDN_NAME, _PackedDeltaRule)):
        fn = getattr(mod, name)
        if not is_packed_binding(fn):
            setattr(mod, name, cls(name, fn))
            changed = True
    return changed


def uninstall() -> None:
    mod = _modeling()
    for name in (CONV_NAME, GDN_NAME):
        fn = getattr(mod, name)
        if is_packed_binding(fn):
            setattr(mod, name, fn.previous)


def installed() -> bool:
    mod = _modeling()
    return all(is_packed_binding(getattr(mod, n)) for n in (CONV_NAME, GDN_NAME))


@contextlib.contextmanager
def without_packing_support() -> Iterator[None]:
    """The unpatched transformers inside the block (tests use it to show what the patch prevents)."""
    was = installed()
    uninstall()
    try:
        yield
    finally:
        if was:
            install()
