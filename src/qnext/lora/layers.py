"""LoRA on megatron's tensor-parallel linears (local and Transformer Engine), TP-correct.

A linear keeps its class, parameters and names; :func:`attach` puts :class:`LoraLinear` in front of
its class (``ColumnParallelLinear`` -> ``LoraColumnParallelLinear``) and adds a ``lora`` child with
one :class:`LoraBranch` per HF target (see ``plan.py``). Why a subclass rather than a wrapper: the
base weight stays at ``<module>.weight``, so the converter's checkpoint keys, megatron's sharded
state dict factories (GDN sections, SwiGLU halves) and every ``isinstance`` check see the same
module as before.

Tensor parallelism (x: the linear's input, s = alpha / r):
- column-parallel: A replicated [r, in], B sharded on its rows. u = A x is whole on every rank; its
  gradient is summed over TP (``copy_to_tensor_model_parallel_region``), or with sequence parallelism
  u is computed on the local tokens and all-gathered (``gather_from_sequence_parallel_region``,
  reduce-scatter backward). Branch j's s * B_j u fills this rank's rows of HF weight j.
- row-parallel: A sharded on its columns (x arrives sharded), B replicated. The partial A_t x_t is
  summed over TP (``reduce_from_tensor_model_parallel_region``), or reduce-scattered over tokens with
  sequence parallelism (``reduce_scatter_to_sequence_parallel_region``); then s * B u.
With sequence parallelism the replicated factor sees only local tokens (column A, row B): it is
marked ``sequence_parallel`` so megatron's grad finalisation sums it over TP, as for norm weights.

Checkpoints: ``sharded_state_dict`` adds ``<module>.lora.<branch>.lora_A`` / ``lora_B`` with the
HF-layout global shapes ([r, in] and [out, r]), so torch_dist reshards them like any weight.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .plan import COLUMN, ROW, BranchPlan, ModulePlan


# ---------------------------------------------------------------------------------------------- math
def column_delta(
    x: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    rows: Sequence[torch.Tensor],
    out_features: int,
    scale: float,
    share: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    dropout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """This rank's output rows of sum_j place_j(s * B_j A_j x) for a column-parallel linear.

    ``a``: each branch's whole A [r, in]; ``b``: its local B rows; ``rows``: where they go in the
    [..., out_features] output. ``share`` makes the stacked A x whole on every rank (a TP collective;
    None at TP1). ``dropout`` is applied to x per branch, as PEFT does.
    """
    drop = dropout or (lambda t: t)
    u = torch.cat([F.linear(drop(x), a_j) for a_j in a], dim=-1)
    if share is not None:
        u = share(u)
    return F.linear(u, placed_b(b, rows, out_features, scale))


def placed_b(b: Sequence[torch.Tensor], rows: Sequence[torch.Tensor], out_features: int, scale: float) -> torch.Tensor:
    """The column-parallel branches' B as one [out_features, n*r] weight: branch j's ``scale * B_j`` in its output
    rows and its own r columns of u = [A_1 x, ..., A_n x], zeros elsewhere. One GEMM then writes the placed, scaled
    delta; the products with the zeros add exact zeros. (Placing B_j u_j after the GEMMs took a zero-filled
    [tokens, out] tensor, an index_copy and a scaling pass over it: three passes over the base output's size.)"""
    block = torch.block_diag(*b) * scale
    return block.new_zeros(out_features, block.shape[1]).index_copy(0, torch.cat(list(rows)), block)


def row_partial(x_local: torch.Tensor, a_local: torch.Tensor) -> torch.Tensor:
    """A row-parallel rank's share A_t x_t of A x (to be summed over TP)."""
    return F.linear(x_local, a_local)


def row_delta(u: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s * B u once u = A x is summed (the scale applied to the small B, not to the [tokens, out] product)."""
    return F.linear(u, b * scale)


def column_weight_delta(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], rows: Sequence[torch.Tensor],
                        out_features: int, scale: float) -> torch.Tensor:
    """s * B A placed into this rank's [out_local, in] shard of a column-parallel weight (float32)."""
    delta = a[0].new_zeros(out_features, a[0].shape[1], dtype=torch.float32)
    for a_j, b_j, rows_j in zip(a, b, rows):
        delta.index_add_(0, rows_j, (b_j.float() @ a_j.float()) * scale)
    return delta


def fused_input_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm a Transformer Engine LayerNorm-linear applies inside its GEMM, recomputed for the
    LoRA path (which must see the same normalised input as the base weight)."""
    eps = float(getattr(module, "eps", 1e-5))
    w = module.layer_norm_weight.float()
    if getattr(module, "zero_centered_gamma", False):
        w = w + 1.0
    xf = x.float()
    if getattr(module, "normalization", "LayerNorm") == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w
    else:
        bias = getattr(module, "layer_norm_bias", None)
        y = F.layer_norm(xf, (xf.shape[-1],), w, None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------- modules
def parallel_kind(module: nn.Module) -> Optional[str]:
    """``column`` / ``row`` for megatron's parallel linears, by attributes rather than class, so the
    Transformer Engine variants count without importing TE: TE linears carry ``parallel_mode``,
    megatron's local ones ``gather_output`` (column) or ``input_is_parallel`` (row)."""
    mode = getattr(module, "parallel_mode", None)
    if mode in (COLUMN, ROW):
        return mode
    if hasattr(module, "input_is_parallel") and hasattr(module, "input_size_per_partition"):
        return ROW
    if hasattr(module, "gather_output") and hasattr(module, "output_size_per_partition"):
        return COLUMN
    return None


def tp_group_of(module: nn.Module):
    """The linear's tensor-parallel group (megatron: ``tp_group``; TE: ``tp_group`` or ``_tp_group``)."""
    for name in ("tp_group", "_tp_group"):
        group = getattr(module, name, None)
        if group is not None:
            return group
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


class LoraBranch(nn.Module):
    """One HF target's A [r, in_local] and B [out_local, r] (this rank's shards)."""

    def __init__(self, plan: BranchPlan, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.plan = plan
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        # output rows of a column-parallel branch; moves with the module, not saved
        self.register_buffer("rows", plan.rows.to(a.device) if plan.rows is not None else None, persistent=False)


class LoraLinear:
    """Mixin in front of a megatron linear's class: base output + this rank's LoRA delta.

    Set by :func:`attach`: ``lora`` (ModuleDict of branches), ``lora_plan``, ``lora_scale``,
    ``lora_dropout``, ``lora_merged``, ``lora_tp_group``, ``lora_sequence_parallel``.
    """

    lora: nn.ModuleDict
    lora_plan: ModulePlan
    lora_scale: float
    lora_dropout: float
    lora_merged: bool
    lora_sequence_parallel: bool

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        if self.lora_merged or not len(self.lora):
            return out, bias
        delta = self.lora_delta(x)
        gather = kwargs.get("runtime_gather_output")
        if gather is None:
            gather = getattr(self, "gather_output", False)
        if self.lora_plan.kind == COLUMN and gather and self.lora_plan.tp_size > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            delta = gather_from_tensor_model_parallel_region(delta, group=self.lora_tp_group)
        return out + delta.to(out.dtype), bias

    # ---- the LoRA path
    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        return fused_input_norm(self, x) if hasattr(self, "layer_norm_weight") else x

    def _dropout(self, per_rank: bool) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """PEFT's dropout on the LoRA input. Inputs that differ per TP rank (row-parallel, sequence
        parallel) draw from megatron's per-rank RNG stream; replicated inputs use the default one,
        which is the same on every TP rank, so the replicated u = A x stays identical."""
        if not self.training or self.lora_dropout <= 0:
            return None
        p = self.lora_dropout

        def drop(t: torch.Tensor) -> torch.Tensor:
            ctx = contextlib.nullcontext()
            if per_rank and t.is_cuda:
                from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

                tracker = get_cuda_rng_tracker()
                if tracker.is_initialized():
                    ctx = tracker.fork()
            with ctx:
                return F.dropout(t, p, training=True)

        return drop

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's LoRA output (same shape and TP/SP layout as the base output before any gather)."""
        from megatron.core.tensor_parallel import mappings as tpm

        plan, group = self.lora_plan, self.lora_tp_group
        h = self._lora_input(x)
        branches = list(self.lora.values())
        sp = self.lora_sequence_parallel and plan.tp_size > 1
        if plan.kind == COLUMN:
            share = None
            if plan.tp_size > 1:
                share = (lambda u: tpm.gather_from_sequence_parallel_region(u, group=group)) if sp else (
                    lambda u: tpm.copy_to_tensor_model_parallel_region(u, group=group))
            return column_delta(h, [br.lora_A for br in branches], [br.lora_B for br in branches],
                                [br.rows for br in branches], plan.out_local, self.lora_scale, share,
                                self._dropout(per_rank=sp))
        (br,) = branches
        if plan.tp_size > 1 and not getattr(self, "input_is_parallel", True):
            h = tpm.scatter_to_tensor_model_parallel_region(h, group=group)
        drop = self._dropout(per_rank=plan.tp_size > 1)
        u = row_partial(drop(h) if drop else h, br.lora_A)
        if plan.tp_size > 1:
            u = (tpm.reduce_scatter_to_sequence_parallel_region(u, group=group) if sp
                 else tpm.reduce_from_tensor_model_parallel_region(u, group=group))
        return row_delta(u, br.lora_B, self.lora_scale)

    # ---- merge
    @torch.no_grad()
    def lora_weight_delta(self) -> torch.Tensor:
        """s * B A for this rank's shard of the base weight, in float32."""
        branches = list(self.lora.values())
        if self.lora_plan.kind == COLUMN:
            return column_weight_delta([br.lora_A for br in branches], [br.lora_B for br in branches],
                                       [br.rows for br in branches], self.lora_plan.out_local, self.lora_scale)
        (br,) = branches
        return (br.lora_B.float() @ br.lora_A.float()) * self.lora_scale

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold s * B A into this rank's base weight; the forward then skips the LoRA path."""
        if not self.lora_merged:
            self._add_to_weight(1.0)
            self.lora_merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """Subtract the folded delta again (exact in float32 up to rounding; bf16 rounds twice)."""
        if self.lora_merged:
            self._add_to_weight(-1.0)
            self.lora_merged = False

    def _add_to_weight(self, sign: float) -> None:
        w = self.weight
        if not w.is_floating_point() or w.element_size() < 2:
            raise TypeError(f"cannot merge LoRA into a {w.dtype} weight (quantised?)")
        w.copy_((w.float() + sign * self.lora_weight_delta()).to(w.dtype))

    # ---- checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
        from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        base = super().sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        lora_prefix = f"{prefix}lora."
        out = {k: v for k, v in base.items() if not k.startswith(lora_prefix)}
        groups = dict(tp_group=self.lora_tp_group or tp_group_of(self), dp_cp_group=metadata["dp_cp_group"])
        sharded_axis = {"lora_B": 0} if self.lora_plan.kind == COLUMN else {"lora_A": 1}
        for name, br in self.lora.items():
            for pname in ("lora_A", "lora_B"):
                key = f"{lora_prefix}{name}.{pname}"
                t = getattr(br, pname)
                if pname in sharded_axis:
                    out[key] = make_tp_sharded_tensor_for_checkpoint(t, key, sharded_axis[pname],
                                                                     prepend_offsets=sharded_offsets, **groups)
                else:
                    out[key] = make_sharded_tensor_for_checkpoint(t, key, prepend_offsets=sharded_offsets, **groups)
        return out


_LORA_CLASSES: dict[type, type] = {}


def lora_class(base: type) -> type:
    """``Lora<Base>``: :class:`LoraLinear` in front of ``base`` (made once per class, module-level
    so that it pickles by name)."""
    if issubclass(base, LoraLinear):
        return base
    if base not in _LORA_CLASSES:
        name = f"Lora{base.__name__}"
        cls = type(name, (LoraLinear, base), {"__module__": __name__, "__qualname__": name})
        globals().setdefault(name, cls)
        _LORA_CLASSES[base] = cls
    return _LORA_CLASSES[base]


def init_a(r: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(r, in_features).uniform_(-bound, bound, generator=generator)


def attach(
    module: nn.Module,
    plan: ModulePlan,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    generator_for: Optional[Callable[[str], torch.Generator]] = None,
) -> LoraLinear:
    """Give ``module`` the branches of ``plan``: A from PEFT's initialisation drawn over the *whole*
    HF shape (then sharded, so every layout starts from the same adapter), B zero."""
    if isinstance(module, LoraLinear):
        raise ValueError("module already has LoRA branches")
    weight = module.weight
    branches = nn.ModuleDict()
    for bp in plan.branches:
        g = generator_for(bp.hf_module) if generator_for else torch.Generator()
        a_full = init_a(r, bp.in_features, g)
        a, b = plan.shard(bp, a_full, torch.zeros(bp.out_features, r))
        branches[bp.name] = LoraBranch(bp, a.to(weight.dtype).to(weight.device).contiguous(),
                                       b.to(weight.dtype).to(weight.device).contiguous())
    module.__class__ = lora_class(type(module))
    module.lora = branches
    module.lora_plan = plan
    module.lora_scale = float(alpha) / r
    module.lora_dropout = float(dropout)
    module.lora_merged = False
    module.lora_tp_group = tp_group_of(module) if torch.distributed.is_initialized() else None
    module.lora_sequence_parallel = bool(getattr(module, "sequence_parallel", False))
    _set_parallel_attributes(module)
    return module


def _set_parallel_attributes(module: LoraLinear) -> None:
    """megatron's parameter attributes: TP-sharded factors count once per TP rank in grad norms,
    replicated factors that see only local tokens (sequence parallel) get their grads summed over TP."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    column = module.lora_plan.kind == COLUMN
    for br in module.lora.values():
        sharded, replicated = (br.lora_B, br.lora_A) if column else (br.lora_A, br.lora_B)
        set_tensor_model_parallel_attributes(sharded, True, 0 if column else 1, 1)
        if module.lora_sequence_parallel:
            replicated.sequence_parallel = True


def detach(module: LoraLinear) -> nn.Module:
    """Remove the branches (unmerging first) and give the module its original class back."""
    module.unmerge_lora()
    base = next(c for c in type(module).__mro__[1:] if c is not LoraLinear and not issubclass(c, LoraLinear))
    del module.lora
    for name in ("lora_config", "lora_plan", "lora_scale", "lora_dropout", "lora_merged", "lora_tp_group",
                 "lora_sequence_parallel"):
        module.__dict__.pop(name, None)
    module.__class__ = base
    return module
