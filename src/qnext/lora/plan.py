"""Which Megatron linears carry which LoRA branches, and where each branch's rows go, read off the
HF <-> Megatron weight map (``qnext.models.qwen3_next``). No process groups, no megatron imports.

PEFT adapts HF linears one by one (``q_proj``, ``k_proj``, ... each with its own A and B). Megatron
fuses some of them into one linear: q/k/v -> ``linear_qkv`` (interleaved per query group),
``in_proj_qkvz`` + ``in_proj_ba`` -> the GDN ``in_proj`` (six head-major sections), the shared
expert's gate/up -> ``linear_fc1`` halves. To compute exactly PEFT's function, a fused linear carries
one branch per HF target, and branch j's output rows land on the rows HF weight j occupies in this
tensor-parallel rank's shard of the fused weight.

Those rows are found by pushing row numbers through the weight map's own transform (the converter's
code), then taking every checkpoint piece's TP chunk, as megatron shards each piece
(``_split_tensor_factory`` for the GDN sections, ``apply_swiglu_sharded_factory`` for fc1 halves,
plain row chunks for ``linear_qkv``). The placement therefore cannot drift from the converter.

Every branch's rows on a rank are one contiguous chunk of the HF weight's rows (true for every
Qwen3-Next target: the fused layouts are head-major), so a column-parallel B stored as TP chunks is
the HF-layout B, whatever the TP size; the same holds for a row-parallel A's column chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config.schema import LoraConfig
from ..errors import UserError
from ..models.qwen3_next import Qwen3NextWeightMap, hf_to_megatron_modules
from ..models.weight_map import Mapping

COLUMN = "column"
ROW = "row"

HF_LAYER = "model.layers.{i}"
MG_LAYER = "decoder.layers.{i}"
_SHARED_EXPERT = "mlp.shared_expert."
_ROUTED_EXPERTS = "mlp.experts."


def linear_modules() -> dict[str, str]:
    """HF linear (layer-relative, ``self_attn.q_proj``) -> Megatron module (``self_attention.linear_qkv``):
    the weight map's table without routed experts (their LoRA is not implemented here)."""
    return {hf: mg for hf, mg in hf_to_megatron_modules().items() if not hf.startswith(_ROUTED_EXPERTS)}


def shared_expert_targets() -> list[str]:
    """PEFT target names of the shared expert's linears (``shared_expert.gate_proj`` ...), from the table."""
    return [hf[len("mlp."):] for hf in linear_modules() if hf.startswith(_SHARED_EXPERT)]


def target_matches(hf_module: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's name is the target or ends with ``.target``."""
    return hf_module == target or hf_module.endswith("." + target)


def peft_targets(cfg: LoraConfig) -> list[str]:
    """PEFT ``target_modules`` of a recipe's LoRA config (the targets, plus the shared expert's
    linears with ``shared_expert``); every name must match a Qwen3-Next linear."""
    if cfg.experts:
        raise UserError("LoRA on routed experts is not supported by the Megatron backend yet",
                        hint="set train.lora.experts=false (train.lora.shared_expert=true adapts the shared expert)")
    targets = list(dict.fromkeys(cfg.targets))
    if cfg.shared_expert:
        targets += [t for t in shared_expert_targets() if t not in targets]
    modules = linear_modules()
    for t in targets:
        if not any(target_matches(hf, t) for hf in modules):
            names = sorted({hf.rsplit(".", 1)[-1] for hf in modules})
            raise UserError(f"LoRA target {t!r} names no linear layer of Qwen3-Next",
                            hint=f"fix train.lora.targets; linear layers are {', '.join(names)}")
    if not targets:
        raise UserError("train.lora.targets is empty", hint="name at least one linear layer, e.g. q_proj")
    return targets


def layer_targets(wm: Qwen3NextWeightMap, layer: int, targets: Sequence[str]) -> dict[str, list[str]]:
    """{Megatron module (layer-relative): [HF weight names the targets select]} for decoder layer ``layer``."""
    out: dict[str, list[str]] = {}
    for hf_rel, mg in linear_modules().items():
        name = f"{HF_LAYER.format(i=layer)}.{hf_rel}.weight"
        if name in wm.by_hf and any(target_matches(hf_rel, t) for t in targets):
            out.setdefault(mg, []).append(name)
    return out


# ---------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True, eq=False)
class BranchPlan:
    """One HF target's LoRA on one Megatron linear, as this TP rank holds it."""

    name: str  # branch key: the HF module's last name component (``q_proj``)
    hf_module: str  # the HF module, ``model.layers.3.self_attn.q_proj`` (PEFT keys hang off it)
    in_features: int  # the HF weight's columns (A is [r, in_features])
    out_features: int  # the HF weight's rows (B is [out_features, r])
    hf_rows: slice  # rows of B held on this rank (column-parallel: one TP chunk; row-parallel: all)
    hf_cols: slice  # columns of A held on this rank (row-parallel: one TP chunk; column-parallel: all)
    rows: torch.Tensor | None  # column-parallel: this rank's output rows of the fused linear, one per B row


@dataclass(frozen=True, eq=False)
class ModulePlan:
    """The LoRA branches of one Megatron linear on one TP rank."""

    layer: int
    module: str  # layer-relative, ``self_attention.linear_qkv``
    kind: str  # COLUMN | ROW
    out_local: int  # output features of this rank's shard of the fused linear
    tp_size: int
    tp_rank: int
    branches: tuple[BranchPlan, ...]

    def shard(self, branch: BranchPlan, a_full: torch.Tensor,
              b_full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A, B) of a branch from the HF-layout A [r, in] and B [out, r]."""
        r = a_full.shape[0]
        if tuple(a_full.shape) != (r, branch.in_features) or tuple(b_full.shape) != (branch.out_features, r):
            raise ValueError(f"{branch.hf_module}: LoRA A {list(a_full.shape)} / B {list(b_full.shape)} do not fit "
                             f"a [{branch.out_features}, {branch.in_features}] weight")
        return a_full[:, branch.hf_cols], b_full[branch.hf_rows]


def _chunk(n: int, tp_size: int, tp_rank: int, what: str) -> slice:
    if n % tp_size:
        raise UserError(f"{what}: {n} rows/columns do not split over tensor parallel size {tp_size}",
                        hint="choose parallel.tp dividing the model's head counts")
    step = n // tp_size
    return slice(tp_rank * step, (tp_rank + 1) * step)


def _module_mappings(wm: Qwen3NextWeightMap, layer: int, module: str) -> list[Mapping]:
    """The weight-map rows that write ``module``'s weight in this layer, in table order."""
    out: list[Mapping] = []
    for hf_rel, mg in linear_modules().items():
        if mg != module:
            continue
        m = wm.by_hf.get(f"{HF_LAYER.format(i=layer)}.{hf_rel}.weight")
        if m is not None and all(m is not o for o in out):
            out.append(m)
    if not out:
        raise KeyError(f"no weight-map row writes {MG_LAYER.format(i=layer)}.{module}.weight")
    return out


def fused_row_sources(
    wm: Qwen3NextWeightMap, layer: int, module: str, tp_size: int = 1, tp_rank: int = 0
) -> tuple[list[str], list[int], torch.Tensor]:
    """For a column-parallel ``module``: (its HF weights, their row offsets in the concatenated HF rows,
    the concatenated-HF row of each output row of this rank's shard).

    Row numbers go through the weight map's transform; each checkpoint piece (a key, or a region of
    one) is chunked over TP as megatron shards it, and the chunks are laid side by side in the order
    of the keys and offsets, which is the fused linear's local row order.
    """
    key = f"{MG_LAYER.format(i=layer)}.{module}.weight"
    mappings = _module_mappings(wm, layer, module)
    names = [n for m in mappings for n in m.hf]
    rows = [wm.hf_shapes[n][0] for n in names]
    offsets = [sum(rows[:j]) for j in range(len(rows))]
    start = dict(zip(names, offsets))
    pieces = []  # (key order, row offset in the key, piece rows, codes)
    key_order: dict[str, int] = {}
    for m in mappings:
        probes = [torch.arange(start[n], start[n] + wm.hf_shapes[n][0], dtype=torch.float64).unsqueeze(1) for n in m.hf]
        for piece, codes in zip(m.pieces, m.to_megatron(probes)):
            if piece.key != key and not piece.key.startswith(key + "."):
                raise AssertionError(f"{m.hf} writes {piece.key}, not {key}")
            if codes.dim() != 2 or len(piece.offset) != 2:
                raise UserError(f"{key}: stacked (expert) weights have no LoRA placement here")
            pieces.append((key_order.setdefault(piece.key, len(key_order)), piece.offset[0], piece.global_shape[0],
                           codes.reshape(-1)))
    pieces.sort(key=lambda p: (p[0], p[1]))
    covered: dict[int, int] = {}
    local = []
    for order, offset, total, codes in pieces:
        if offset != covered.get(order, 0):
            raise AssertionError(f"{key}: weight-map pieces do not tile the rows (gap or overlap at {offset})")
        covered[order] = offset + codes.numel()
        local.append(codes[_chunk(codes.numel(), tp_size, tp_rank, key)])
    return names, offsets, torch.cat(local).long()


def plan_module(
    wm: Qwen3NextWeightMap,
    layer: int,
    module: str,
    hf_weights: Sequence[str],
    kind: str,
    tp_size: int = 1,
    tp_rank: int = 0,
) -> ModulePlan:
    """The branches of ``module`` (layer-relative) for the HF weights ``hf_weights`` on one TP rank."""
    dims = {n: wm.hf_shapes[n] for n in hf_weights}
    hf_module = lambda n: n[: -len(".weight")]  # noqa: E731
    branches = []
    if kind == COLUMN:
        names, offsets, codes = fused_row_sources(wm, layer, module, tp_size, tp_rank)
        for n in hf_weights:
            j = names.index(n)
            out_rows, in_features = dims[n]
            hit = ((codes >= offsets[j]) & (codes < offsets[j] + out_rows)).nonzero().reshape(-1)
            hf_rows = codes[hit] - offsets[j]
            order = torch.argsort(hf_rows)
            hf_rows, positions = hf_rows[order], hit[order]
            chunk = _chunk(out_rows, tp_size, tp_rank, n)
            if not torch.equal(hf_rows, torch.arange(chunk.start, chunk.stop)):
                raise UserError(f"{n}: on TP rank {tp_rank} its rows are not one contiguous chunk of the HF weight",
                                hint="this fused layout needs a layout-aware LoRA checkpoint; use parallel.tp=1")
            branches.append(BranchPlan(hf_module(n).rsplit(".", 1)[-1], hf_module(n), in_features, out_rows,
                                       chunk, slice(None), positions))
        out_local = codes.numel()
    elif kind == ROW:
        (n,) = hf_weights
        m = wm.by_hf[n]
        out_rows, in_features = dims[n]
        perm = m.transform.row_permutation([out_rows], wm.dims)
        if len(m.hf) != 1 or perm is None or not torch.equal(perm, torch.arange(out_rows)):
            raise UserError(f"{n}: a row-parallel LoRA needs the HF weight unchanged in Megatron "
                            f"({m.rule.transform.describe()})")
        branches.append(BranchPlan(hf_module(n).rsplit(".", 1)[-1], hf_module(n), in_features, out_rows, slice(None),
                                   _chunk(in_features, tp_size, tp_rank, n), None))
        out_local = out_rows
    else:
        raise ValueError(f"kind must be {COLUMN!r} or {ROW!r}, got {kind!r}")
    if len({b.name for b in branches}) != len(branches):
        raise AssertionError(f"{module}: two branches share a name {[b.name for b in branches]}")
    return ModulePlan(layer, module, kind, out_local, tp_size, tp_rank, tuple(branches))

