"""The routed experts' input gathered again in the backward instead of kept for it.

With every expert on this GPU (:class:`~qnext.megatron.dispatch.SortedTokenDispatcher`) the experts' input is
the MoE block's input gathered into expert order: k rows per token (Qwen3-Next: 10 x 2048 bf16 values, 40 KB
per token and layer, half of what the MoE block keeps for the backward). The first expert projection (fc1)
needs it again for its weight gradient, and autograd would keep it from the forward to then. The MoE block's
input is kept anyway (the router's and the shared expert's weight gradients need it), so here the gathered
rows are saved as (input, row index) and gathered again when the backward unpacks them: one memory-bound
gather per layer and micro-batch (about 0.2 ms for 8192 tokens on an H200) for 40 KB per token. The
gradients are the same bits (the same rows are read).

The dispatcher marks the rows it gathers (:func:`mark_gathered`); the experts run fc1 inside
:func:`regathered`, which applies where rows are marked and autograd records (a no-grad forward, e.g. the
first pass of megatron's reentrant recompute, saves nothing). ``QNEXT_MOE_REGATHER=0`` keeps the rows
(for comparisons). ``qnext.plan`` counts the rows as not kept where the sorted dispatcher applies.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, NamedTuple, Optional

import torch

ENV = "QNEXT_MOE_REGATHER"
_SOURCE = "_qnext_gathered_from"


def regather_enabled() -> bool:
    """``QNEXT_MOE_REGATHER`` (default 1): whether marked expert inputs are gathered again in the backward."""
    from ..errors import UserError

    raw = os.environ.get(ENV, "1").strip()
    if raw not in ("0", "1"):
        raise UserError(f"{ENV}={raw!r} is not 0 or 1", hint=f"unset {ENV} (default 1) or set it to 0 to keep the rows")
    return raw == "1"


class Source(NamedTuple):
    """Where marked rows come from: ``source.index_select(0, index)``; ``gather(source)`` makes them again with
    the dispatcher's autograd (its deterministic backward)."""

    source: torch.Tensor
    index: torch.Tensor
    gather: Callable[[torch.Tensor], torch.Tensor]


def mark_gathered(rows: torch.Tensor, source: torch.Tensor, index: torch.Tensor,
                  gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Note on ``rows`` that they are ``source.index_select(0, index)`` (the same tensor is returned)."""
    setattr(rows, _SOURCE, Source(source, index, gather))
    return rows


def gathered_from(rows: torch.Tensor) -> Optional[Source]:
    """The :class:`Source` of rows marked by :func:`mark_gathered`, else None."""
    return getattr(rows, _SOURCE, None)


def _layout(t: torch.Tensor):
    """What :func:`_rows_of` compares: dtype, row shape and strides, storage address and offset, rows (None for a
    tensor without a plain storage, e.g. a quantized subclass)."""
    try:
        return t.dtype, tuple(t.shape[1:]), tuple(t.stride()), t.untyped_storage().data_ptr(), t.storage_offset(), \
            t.shape[0] if t.dim() else 0
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _rows_of(t: torch.Tensor, rows) -> tuple[int, int] | None:
    """``(first, count)`` when ``t`` is ``rows[first:first + count]`` (the tensor itself, or a slice of whole rows
    as the per-expert loop saves), else None. ``rows`` is the marked tensor's :func:`_layout` (plain values: the
    pack hook must not keep the rows alive)."""
    mine = _layout(t)
    if mine is None or rows is None or mine[:4] != rows[:4] or not rows[2] or rows[2][0] == 0:
        return None
    first, rem = divmod(mine[4] - rows[4], rows[2][0])
    if rem or first < 0 or first + mine[5] > rows[5]:
        return None
    return first, mine[5]


class _Gathered:
    """A saved tensor that is ``source.index_select(0, index)``, re-made when the backward asks for it."""

    __slots__ = ("source", "index", "version")

    def __init__(self, source: torch.Tensor, index: torch.Tensor):
        self.source, self.index, self.version = source, index, source._version

    def get(self) -> torch.Tensor:
        if self.source._version != self.version:
            raise RuntimeError("the MoE block's input was modified in place after the experts' forward: the experts' "
                               f"input cannot be gathered again for the backward (set {ENV}=0 to keep it)")
        return self.source.index_select(0, self.index)


@contextlib.contextmanager
def regathered(rows: torch.Tensor) -> Iterator[None]:
    """Within, whatever autograd saves that is ``rows`` (marked by :func:`mark_gathered`) is saved as its source
    and index and gathered again in the backward; everything else is saved as usual."""
    source = gathered_from(rows)
    if source is None or not torch.is_grad_enabled() or not regather_enabled():
        yield
        return
    src, index = source.source, source.index
    layout = _layout(rows)

    def pack(t: torch.Tensor):
        part = _rows_of(t, layout)
        if part is None:
            return t
        first, count = part
        return _Gathered(src, index if count == layout[5] else index[first:first + count])

    def unpack(p):
        return p.get() if isinstance(p, _Gathered) else p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
