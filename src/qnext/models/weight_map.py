"""The vocabulary of a declarative HF <-> Megatron weight map: rules, transforms, expansion.

An architecture module (``qwen3_next.py``) writes one table of :class:`Rule` rows: which HF on-disk
tensors become which Megatron ``torch_dist`` keys, and by which :class:`Transform`. ``expand``
turns the table into concrete :class:`Mapping` rows for one model config (every layer, every
expert), with shapes. The converter, the exporter, the LoRA exporter, the planner and the tests all
walk that list; none of them knows a tensor name.

Megatron side: a Mapping writes one or more *pieces*. A piece is a region (``offset``, ``shape``) of
a checkpoint tensor (``key``, ``global_shape``). Most pieces are the whole tensor; routed experts
and the SwiGLU halves are regions, so each HF tensor is written as its own checkpoint chunk without
stacking 512 experts in memory. Any TP/EP/ETP/PP layout then reads the regions it needs.

Every transform is pure data movement (bit-exact both ways) except where a rule says ``lossy``
(the +1 shift between a plain and a zero-centered RMSNorm weight); the converter checks those
tensor by tensor and keeps the original bytes wherever ``w - 1 + 1 != w``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Transforms: functions between the HF tensors of one rule and its Megatron pieces.
# Each works on any trailing dimensions (a LoRA B matrix has the rows of its weight), and is
# parameterised by the architecture dims it needs (``dims`` from the architecture module).
# ---------------------------------------------------------------------------------------------


class Transform:
    """HF tensors <-> Megatron pieces. Subclasses are small and say which layout they encode."""

    #: True when the arithmetic may round (the converter then verifies it tensor by tensor).
    lossy: bool = False

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_hf(self, mg: Sequence[torch.Tensor], dims: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def row_permutation(self, hf_rows: Sequence[int], dims: Any) -> torch.Tensor | None:
        """Index i of the concatenated Megatron rows -> row of the concatenated HF rows, if the
        transform is a pure row shuffle (used to move LoRA B matrices); None otherwise."""
        rows = [torch.arange(n, dtype=torch.float64).unsqueeze(1) for n in hf_rows]
        offset = 0
        shifted = []
        for r, n in zip(rows, hf_rows):
            shifted.append(r + offset)
            offset += n
        out = self.to_megatron(shifted, dims)
        return torch.cat([o.reshape(-1) for o in out]).long()

    def describe(self) -> str:
        return type(self).__name__


class Identity(Transform):
    """Same tensor, same layout."""

    def to_megatron(self, hf, dims):
        return [hf[0]]

    def to_hf(self, mg, dims):
        return [mg[0]]


class ShiftToZeroCentered(Transform):
    """HF stores a plain RMSNorm weight w (y = x_hat * w, initialised to ones); Megatron's norm is
    zero-centered (y = x_hat * (1 + w')) so w' = w - 1. Computed in float32, cast back."""

    lossy = True

    def to_megatron(self, hf, dims):
        w = hf[0]
        return [(w.float() - 1.0).to(w.dtype)]

    def to_hf(self, mg, dims):
        w = mg[0]
        return [(w.float() + 1.0).to(w.dtype)]

    def row_permutation(self, hf_rows, dims):
        return None


class SplitRows(Transform):
    """One HF tensor -> consecutive row blocks of the given sizes (``sizes(dims)``)."""

    def __init__(self, sizes: Callable[[Any], Sequence[int]], what: str = ""):
        self.sizes = sizes
        self.what = what

    def to_megatron(self, hf, dims):
        return list(torch.split(hf[0], list(self.sizes(dims)), dim=0))

    def to_hf(self, mg, dims):
        return [torch.cat(list(mg), dim=0)]

    def describe(self):
        return f"SplitRows({self.what})" if self.what else "SplitRows"


class Place(Transform):
    """The HF tensor is one region of a larger Megatron tensor (no data movement).

    ``global_shape(dims)`` is the Megatron tensor's shape; ``offset(dims, index)`` the region's
    corner, where ``index`` is the expert number for per-expert rules (else None). With
    ``stack=True`` the region has a leading axis of 1 (an expert slot in a stacked tensor).
    """

    def __init__(
        self,
        global_shape: Callable[[Any], Shape],
        offset: Callable[[Any, int | None], Shape],
        stack: bool = False,
        what: str = "",
    ):
        self.global_shape = global_shape
        self.offset = offset
        self.stack = stack
        self.what = what

    def to_megatron(self, hf, dims):
        return [hf[0].unsqueeze(0) if self.stack else hf[0]]

    def to_hf(self, mg, dims):
        return [mg[0].squeeze(0) if self.stack else mg[0]]

    def row_permutation(self, hf_rows, dims):
        return None

    def describe(self):
        return f"Place({self.what})" if self.what else "Place"


# ---------------------------------------------------------------------------------------------
# Rules and their expansion
# ---------------------------------------------------------------------------------------------


# How a Megatron tensor is spread over ranks: whole on every tensor-parallel rank (norms, the router),
# partitioned over tensor parallelism (linears, the vocabulary, GDN's per-head A_log/dt_bias/conv), or
# stacked experts partitioned over expert (and expert-tensor) parallelism. The planner counts memory by
# it; ``tests/unit/test_weight_map_splits.py`` checks it against megatron's own parameter attributes.
REPLICATED, TENSOR_PARALLEL, EXPERT_PARALLEL = "replicated", "tp", "ep"
SPLITS = (REPLICATED, TENSOR_PARALLEL, EXPERT_PARALLEL)


@dataclass(frozen=True)
class Rule:
    """One row of a weight map.

    ``scope`` names the layers the rule applies to; the architecture module defines the scopes
    (e.g. ``model``, ``linear_attention``, ``expert``). Templates use ``{hf}`` / ``{mg}`` for the
    layer prefixes and ``{e}`` for the expert index.
    """

    scope: str
    hf: tuple[str, ...]
    mg: tuple[str, ...]
    transform: Transform = field(default_factory=Identity)
    note: str = ""
    split: str = "tp"  # how the Megatron tensor is spread over ranks: SPLITS

    @staticmethod
    def of(scope: str, hf: str | Sequence[str], mg: str | Sequence[str], transform: Transform | None = None,
           note: str = "", split: str = "tp") -> "Rule":
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)  # noqa: E731
        return Rule(scope, as_tuple(hf), as_tuple(mg), transform or Identity(), note, split)


@dataclass(frozen=True)
class Piece:
    """A region of one Megatron checkpoint tensor."""

    key: str
    global_shape: Shape
    offset: Shape
    shape: Shape

    @property
    def whole(self) -> bool:
        return self.shape == self.global_shape and not any(self.offset)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Mapping:
    """A rule applied to one layer (and expert): concrete names and shapes."""

    rule: Rule
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    pieces: tuple[Piece, ...]
    dims: Any = field(compare=False, repr=False)

    @property
    def transform(self) -> Transform:
        return self.rule.transform

    def to_megatron(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.transform.to_megatron(tensors, self.dims)

    def to_hf(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.transform.to_hf(tensors, self.dims)


@dataclass(frozen=True)
class ExtraState:
    """An empty ``_extra_state`` object that Megatron's linear layers put in every checkpoint."""

    key: str  # the ShardedObject unique key, e.g. "decoder.layers.0.self_attention.in_proj._extra_state/shard_0_1"


@dataclass(frozen=True)
class Site:
    """Where a scope applies: the template variables for one layer (and expert)."""

    scope: str
    vars: dict[str, Any]


def expand(
    rules: Sequence[Rule],
    sites: Iterator[Site] | Sequence[Site],
    dims: Any,
    hf_shape: Callable[[str, Any], Shape],
) -> list[Mapping]:
    """Every rule at every site where its scope applies, with HF shapes (``hf_shape(template,
    dims)``) and the Megatron pieces the transform produces (worked out once per rule)."""
    by_scope: dict[str, list[Rule]] = {}
    for r in rules:
        by_scope.setdefault(r.scope, []).append(r)
    out: list[Mapping] = []
    out_shapes: dict[int, tuple[tuple[Shape, ...], list[Shape]]] = {}  # per rule: same dims everywhere
    for site in sites:
        for rule in by_scope.get(site.scope, []):
            hf_names = tuple(t.format(**site.vars) for t in rule.hf)
            if id(rule) not in out_shapes:
                shapes = tuple(tuple(hf_shape(t, dims)) for t in rule.hf)
                # uninitialised CPU bytes: cheap, and faster than meta tensors (whose first torch.cat
                # imports the symbolic-shape machinery for seconds)
                probes = [torch.empty(s, dtype=torch.uint8) for s in shapes]
                outs = rule.transform.to_megatron(probes, dims)
                if len(outs) != len(rule.mg):
                    raise AssertionError(f"{rule}: transform gives {len(outs)} tensors for {len(rule.mg)} keys")
                out_shapes[id(rule)] = (shapes, [tuple(o.shape) for o in outs])
            shapes, piece_shapes = out_shapes[id(rule)]
            pieces = []
            for key_t, shape in zip(rule.mg, piece_shapes):
                key = key_t.format(**site.vars)
                if isinstance(rule.transform, Place):
                    gshape = tuple(rule.transform.global_shape(dims))
                    offset = tuple(rule.transform.offset(dims, site.vars.get("e")))
                else:
                    gshape, offset = shape, (0,) * len(shape)
                pieces.append(Piece(key, gshape, offset, shape))
            out.append(Mapping(rule, hf_names, shapes, tuple(pieces), dims))
    return out


def megatron_tensors(mappings: Sequence[Mapping]) -> dict[str, Shape]:
    """Every Megatron checkpoint key with its global shape (pieces of one key must tile it)."""
    shapes: dict[str, Shape] = {}
    covered: dict[str, int] = {}
    for m in mappings:
        for p in m.pieces:
            if shapes.setdefault(p.key, p.global_shape) != p.global_shape:
                raise AssertionError(f"{p.key}: pieces disagree on the global shape")
            covered[p.key] = covered.get(p.key, 0) + p.numel
    for key, shape in shapes.items():
        if covered[key] != math.prod(shape):
            raise AssertionError(f"{key}: pieces cover {covered[key]} of {math.prod(shape)} elements")
    return shapes
