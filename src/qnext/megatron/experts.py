"""Routed MoE experts on one grouped GEMM per projection (TE-free), checkpoint-compatible with
megatron's ``SequentialMLP``.

``SequentialMLP`` runs a Python loop of small GEMMs, one per local expert: with 512 experts that is
1024 kernel launches per layer and pass. Here each projection is one
``torch.nn.functional.grouped_mm`` over all local experts (bf16 on the GPU); elsewhere (CPU, float32,
unaligned sizes) a loop over experts computes the same function.

Weights live in two 3-D parameters, ``linear_fc1.weight`` [E_local, 2*F/etp, H] (each expert's rows
are [gate; up], as in megatron's fused SwiGLU fc1) and ``linear_fc2.weight`` [E_local, H, F/etp].
``sharded_state_dict`` emits, per expert, exactly the ShardedTensors and (empty) ``_extra_state``
ShardedObjects ``SequentialMLP`` emits (same keys, global shapes, offsets, replica ids; the fc1
gate/up halves sharded separately over expert-TP),
so torch_dist checkpoints move freely between this module, ``SequentialMLP`` and ``TEGroupedMLP``.
Like ``SequentialMLP`` it does no communication: the token dispatcher moves tokens across EP/ETP,
and expert weights carry ``allreduce=False`` so DDP reduces their grads over the expert-DP group.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_object_for_checkpoint
from megatron.core.utils import divide

from .fused import swiglu_probs
from .grouped_wgrad import GroupedLinearWgradAccum, fused_wgrad_applies
from .regather import gathered_from, regathered

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_usable(x: torch.Tensor, weight: torch.Tensor, weight_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the fused grouped GEMM applies: CUDA bf16 with 16-byte aligned rows (``weight_dtype``: the
    dtype the weight is computed in, when it is stored otherwise, e.g. FP8 dequantized to bf16)."""
    return (
        _GROUPED_MM is not None
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and (weight_dtype or weight.dtype) == torch.bfloat16
        and x.shape[0] > 0
        and weight.shape[-1] % 8 == 0
        and weight.shape[-2] % 8 == 0
    )


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: Optional[list[int]], offsets: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Rows of ``x`` grouped by expert (``counts[e]`` rows each, or ending at ``offsets[e]``) times
    ``weight[e].T`` -> [T, out]."""
    if offsets is not None and grouped_mm_usable(x, weight):
        return _GROUPED_MM(x, weight.transpose(-2, -1), offs=offsets)
    if counts is None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    outs = [F.linear(chunk, weight[e]) for e, chunk in enumerate(torch.split(x, counts))]
    if not outs:
        return x.new_zeros(0, weight.shape[-2])
    return torch.cat(outs, dim=0)


BASES = ("bf16", "fp8", "nf4")


class ExpertWeight(nn.Module):
    """Holds one stacked 3-D expert weight [E_local, out, in]: a bf16 parameter ``weight``, or frozen
    quantized storage (``base``): FP8 buffers ``q`` and ``scale`` (``qnext.quant.fp8``) or an NF4 stack
    (``qnext.quant.nf4``, torchao), dequantized by :meth:`dequantized`."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, *, dtype, device, base: str = "bf16"):
        super().__init__()
        if base not in BASES:
            raise ValueError(f"expert base {base!r}: expected one of {', '.join(BASES)}")
        self.base = base
        self._shape = torch.Size((num_experts, out_features, in_features))
        self.device = torch.empty(0, device=device).device  # device=None: the default (or meta) device
        self.nf4 = None  # qnext.quant.nf4.Nf4Stack once filled (base nf4)
        if base == "fp8":  # frozen FP8 storage from the start: the bf16 weight is never allocated
            from ..quant.fp8 import FP8

            # not persistent: quantized experts are never saved (the pretrained checkpoint holds them; quant_load fills them)
            self.register_buffer("q", torch.empty(num_experts, out_features, in_features, dtype=FP8, device=device),
                                 persistent=False)
            self.register_buffer("scale", torch.ones(num_experts, out_features, 1, dtype=torch.float32, device=device),
                                 persistent=False)
        elif base == "nf4":  # filled by set_quantized_ (torchao's NF4 tensors are no module buffers)
            from ..quant.nf4 import require

            require(out_features, in_features)  # missing torchao: one message at build time, not at the first step
        else:
            self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, dtype=dtype, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape if not self.quantized else self._shape

    def get_extra_state(self) -> None:
        """Like megatron's local linears: an (empty) extra state, so checkpoints match SequentialMLP's."""
        return None

    def set_extra_state(self, state) -> None:
        """Extra state (None per expert, or TE's fp8 metadata) carries nothing this module uses."""

    @property
    def quantized(self) -> bool:
        return self.base != "bf16"

    @property
    def filled(self) -> bool:
        return self.base == "fp8" or self.nf4 is not None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The quantized weight in ``dtype`` (a new tensor)."""
        if self.base == "fp8":
            from .fused import fp8_dequantize

            return fp8_dequantize(self.q, self.scale, dtype)
        if self.nf4 is None:
            raise RuntimeError("NF4 expert weights used before they were loaded (qnext.megatron.quant_load)")
        return self.nf4.dequantize(dtype)

    @torch.no_grad()
    def quantize_(self, base: str = "fp8") -> None:
        """Hold the (frozen) weight quantized (``base`` fp8 or nf4); the bf16 parameter is released."""
        if self.quantized:
            if base != self.base:
                raise ValueError(f"expert weights are already {self.base}, not {base}")
            return
        if base not in BASES[1:]:
            raise ValueError(f"quantize to {base!r}: expected fp8 or nf4")
        if self.weight.requires_grad:
            raise ValueError("only frozen expert weights can be quantized (LoRA with train.lora.experts=false)")
        if base == "nf4":  # every check before the bf16 weight goes: a failure leaves the module as it was
            from ..quant.nf4 import require

            require(*self.weight.shape[1:])
        w = self.weight.data
        self._shape, self.device = w.shape, w.device
        del self.weight
        self.base = base
        if base == "fp8":
            from ..quant.fp8 import FP8

            self.register_buffer("q", torch.empty(w.shape, dtype=FP8, device=w.device), persistent=False)
            self.register_buffer("scale", torch.empty(*w.shape[:2], 1, dtype=torch.float32, device=w.device),
                                 persistent=False)
        self.set_quantized_(w)

    def _apply(self, fn, recurse=True):
        """Device moves apply to the quantized storage, dtype casts do not: megatron's ``Float16Module`` calls
        ``module.bfloat16()``, which would otherwise turn the e4m3 values (a floating-point dtype) and their
        scales into bf16, silently doubling the experts' memory."""
        if not self.quantized:
            return super()._apply(fn, recurse)
        kept = {k: self._buffers.pop(k) for k in ("q", "scale") if k in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            target = fn(torch.empty(0, device=self.device)).device  # where fn sends a tensor; its dtype is ignored
            for k, t in kept.items():
                self._buffers[k] = t if t.device == target else t.to(device=target)
            if self.nf4 is not None:
                self.nf4 = self.nf4.to(target)
            self.device = target
        return self

    @torch.no_grad()
    def set_quantized_(self, w: torch.Tensor) -> None:
        """Quantize ``w`` (the bf16 weight, e.g. just loaded) into this module's storage."""
        if tuple(w.shape) != tuple(self._shape):
            raise ValueError(f"expert weight of shape {tuple(w.shape)} for {self.base} storage of shape "
                             f"{tuple(self._shape)}")
        w = w.to(self.device)
        if self.base == "fp8":
            from ..quant.fp8 import quantize_rows

            quantize_rows(w, out=(self.q, self.scale))  # in place, a chunk of rows at a time
        elif self.base == "nf4":
            from ..quant.nf4 import Nf4Stack

            self.nf4 = None  # the old storage goes before the new one is made
            self.nf4 = Nf4Stack.quantize(w)
        else:
            raise ValueError("bf16 expert weights are not quantized storage")

    def extra_repr(self) -> str:
        e, o, i = self.shape
        fmt = {"fp8": ", fp8 e4m3", "nf4": ", nf4"}.get(self.base, "")
        return f"experts={e}, out_features={o}, in_features={i}{fmt}"


class GroupedGemmExperts(MegatronModule):
    """Drop-in for ``SequentialMLP``: ``forward(tokens sorted by local expert, tokens_per_expert,
    probs) -> (output, None)``."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name=None):
        super().__init__(config=config)
        if getattr(config, "fp8", None) or getattr(config, "fp4", None):
            raise ValueError("GroupedGemmExperts has no fp8/fp4 path; use TEGroupedMLP")
        if config.add_bias_linear:
            raise ValueError("GroupedGemmExperts implements bias-free experts (Qwen3-Next has none)")
        if config.moe_latent_size is not None:
            raise ValueError("GroupedGemmExperts does not implement moe_latent_size")
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.glu = bool(config.gated_linear_unit)
        etp = self.tp_group.size()
        ffn_local = divide(config.moe_ffn_hidden_size, etp)
        fc1_out = 2 * ffn_local if self.glu else ffn_local
        device = None if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        self.base = getattr(config, "qnext_expert_base", "bf16")  # fp8/nf4: frozen quantized storage (LoRA, qnext.quant)
        kw = dict(dtype=config.params_dtype, device=device, base=self.base)
        self.linear_fc1 = ExpertWeight(num_local_experts, fc1_out, config.hidden_size, **kw)
        self.linear_fc2 = ExpertWeight(num_local_experts, config.hidden_size, ffn_local, **kw)
        self._load_view: Optional[dict[str, torch.Tensor]] = None  # see sharded_state_dict
        # parallel.recompute=experts_act (qnext's field: megatron's "moe_act" accepts only its own experts)
        self.recompute_activation = bool(getattr(config, "qnext_recompute_experts_act", False))
        # parallel.recompute=experts: the routed experts (gather, fc1, activation, fc2) recomputed in the backward
        self.recompute_experts = bool(getattr(config, "qnext_recompute_experts", False))
        # gradient accumulation fusion (QNEXT_GRAD_ACCUM_FUSION=1): weight gradients straight into DDP's fp32 main_grad
        self.fuse_wgrad = bool(getattr(config, "gradient_accumulation_fusion", False))
        if self.base != "bf16":
            return  # buffers, not parameters: nothing to initialise, split or train (filled at load)

        use_expert_pgs = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size
        )
        for param, dim, stride in ((self.linear_fc1.weight, 1, 2 if self.glu else 1), (self.linear_fc2.weight, 2, 1)):
            setattr(param, "tensor_model_parallel", True)
            setattr(param, "partition_dim", dim)
            setattr(param, "partition_stride", stride)
            setattr(param, "allreduce", not use_expert_pgs)
        if config.perform_initialization:
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        def init_all(weight, init_method):
            for e in range(weight.shape[0]):
                init_method(weight[e])

        if self.linear_fc1.weight.is_cuda:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                init_all(self.linear_fc1.weight, self.config.init_method)
                init_all(self.linear_fc2.weight, self.config.output_layer_init_method)
        else:
            init_all(self.linear_fc1.weight, self.config.init_method)
            init_all(self.linear_fc2.weight, self.config.output_layer_init_method)

    def _activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """act(fc1 output) * probs, cast to the tokens' dtype: SwiGLU is fused (``qnext.megatron.fused``)."""
        cfg = self.config
        if self.glu and cfg.activation_func is F.silu and cfg.activation_func_clamp_value is None \
                and cfg.glu_linear_offset == 0.0:
            return swiglu_probs(h, probs)
        if not self.glu:
            act = cfg.activation_func(h)
        else:
            x_glu, x_lin = torch.chunk(h, 2, dim=-1)
            if (val := cfg.activation_func_clamp_value) is not None:
                x_glu = x_glu.clamp(min=None, max=val)
                x_lin = x_lin.clamp(min=-val, max=val)
            act = cfg.activation_func(x_glu) * (x_lin + cfg.glu_linear_offset)
        return (act * probs.unsqueeze(-1)).to(h.dtype)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with topk=1"
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        counts, offsets = None, None
        fc1 = self.linear_fc1.weight if not self.linear_fc1.quantized else x.new_empty(0, *self.linear_fc1.shape[1:])
        if grouped_mm_usable(x, fc1):
            # group ends from the counts where they are (the GPU, from qnext's sorted dispatcher): no host copy
            t = torch.as_tensor(tokens_per_expert, device=x.device)
            offsets = t.cumsum(0, dtype=torch.int32)
        else:  # the per-expert loop needs the counts on the host
            t = tokens_per_expert
            counts = [int(c) for c in (t.tolist() if isinstance(t, torch.Tensor) else t)]
        if self.recompute_experts and torch.is_grad_enabled():
            # parallel.recompute=experts: nothing of the routed experts is kept for the backward but their input's
            # source (the MoE block's input, kept anyway) and the routing; the backward gathers and runs fc1, the
            # activation and fc2 again (the checkpoint stops after the last saved tensor, and fc2's, fused weight
            # gradient or not, are saved only once its GEMM has run: autograd packs a Function's after its forward)
            src = gathered_from(x)
            fn, args = (self._routed_from, (src.gather, src.source)) if src is not None else (self._routed, (x,))
            out = torch.utils.checkpoint.checkpoint(fn, *args, probs, counts, offsets, use_reentrant=False,
                                                    preserve_rng_state=False)
            return out, None
        return self._routed(x, probs, counts, offsets), None

    def _routed_from(self, gather, source: torch.Tensor, probs, counts, offsets) -> torch.Tensor:
        return self._routed(gather(source), probs, counts, offsets)

    def _routed(self, x: torch.Tensor, probs: torch.Tensor, counts, offsets) -> torch.Tensor:
        """fc1, the activation times the routing probability, fc2, for rows grouped by expert."""
        with regathered(x):  # the dispatcher's gathered rows: gathered again for fc1's backward, not kept
            h = self._project(self.linear_fc1, x, counts, offsets, self.fuse_wgrad)
        if self.recompute_activation and torch.is_grad_enabled():
            # keep fc1's output and the probabilities, not the activation's output: it is recomputed in backward
            h = torch.utils.checkpoint.checkpoint(self._activation, h, probs, use_reentrant=False)
        else:
            h = self._activation(h, probs)
        return self._project(self.linear_fc2, h, counts, offsets, self.fuse_wgrad)

    @staticmethod
    def _project(m: "ExpertWeight", x: torch.Tensor, counts, offsets, fuse_wgrad: bool = False) -> torch.Tensor:
        if m.quantized:
            from ..quant.grouped import quantized_grouped_linear

            return quantized_grouped_linear(x, m.dequantized, grouped_linear, counts, offsets)
        if fuse_wgrad and fused_wgrad_applies(m.weight):
            return GroupedLinearWgradAccum.apply(x, m.weight, grouped_linear, counts, offsets)
        return grouped_linear(x, m.weight, counts, offsets)

    def quantize_(self, base: str = "fp8") -> None:
        """Frozen expert weights quantized in place from bf16 (``ExpertWeight.quantize_``): fp8 or nf4."""
        self.linear_fc1.quantize_(base)
        self.linear_fc2.quantize_(base)
        self.base = base

    def backward_dw(self):
        """Weight grads are computed in the ordinary backward (no delayed wgrad)."""

    # ------------------------------------------------------------------ checkpoint layout
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Per-expert ShardedTensors identical to ``SequentialMLP.sharded_state_dict``'s.

        Quantized (FP8/NF4) experts are frozen copies of the pretrained checkpoint's: they are neither saved nor loaded
        with the model (an empty dict), and ``qnext.megatron.quant_load`` fills them one layer at a time,
        asking this method for the bf16 layout of one module with ``_load_view`` set to bf16 buffers."""
        quantized = self.linear_fc1.quantized or self.linear_fc2.quantized
        if quantized and self._load_view is None:
            return {}
        weights = self._load_view if quantized else {n: getattr(self, n).weight for n in ("linear_fc1", "linear_fc2")}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = bool((metadata or {}).get("singleton_local_shards", False))
        num_global = self.ep_group.size() * self.num_local_experts
        first_global = self.ep_group.rank() * self.num_local_experts
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        dp_rank = self.dp_group.rank()
        sd = {}
        for name, tp_axis, split_glu in (("linear_fc1", 0, self.glu), ("linear_fc2", 1, False)):
            weight = weights[name]
            sd[f"{prefix}{name}.weight"] = _ExpertStackFactory(
                key=f"{prefix}experts.{name}.weight",
                data=weight,
                build_fn=_make_build_fn(
                    name, tp_axis, split_glu, tuple(sharded_offsets), first_global, num_global, tp_rank, tp_size,
                    singleton,
                ),
                merge_fn=_make_merge_fn(split_glu, weight),
                replica_id=(0, 0, dp_rank),
            )
            # One (empty) extra-state object per expert, keyed like SequentialMLP's linears'.
            objects = []
            for e in range(self.num_local_experts):
                g = first_global + e
                if singleton:
                    okey, offsets = f"{prefix}experts.{g}.{name}._extra_state", tuple(sharded_offsets)
                else:
                    okey = f"{prefix}experts.{name}._extra_state"
                    offsets = (*sharded_offsets, (len(sharded_offsets), g, num_global))
                objects.append(make_sharded_object_for_checkpoint(None, okey, offsets, replica_id=(0, tp_rank, dp_rank)))
            sd[f"{prefix}{name}._extra_state"] = objects
        return sd


class _ExpertStackFactory(ShardedTensorFactory):
    """A ShardedTensorFactory (only a distinct name for readability in dumps)."""


def _make_build_fn(name, tp_axis, split_glu, sharded_offsets, first_global, num_global, tp_rank, tp_size, singleton):
    suffix = f"{name}.weight"

    @torch.no_grad()
    def build(key: str, t: torch.Tensor, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError("flattened (fully-sharded) expert tensors are not supported")
        assert key.endswith(suffix), (key, suffix)
        base = key[: -len(suffix)]  # "...mlp.experts.experts." (optimizer states add their own prefix)
        out = []
        for e in range(t.shape[0]):
            g = first_global + e
            if singleton:
                ekey, offsets = f"{base}{g}.{suffix}", tuple(sharded_offsets)
            else:
                ekey, offsets = key, (*sharded_offsets, (len(sharded_offsets), g, num_global))
            prepend = len(offsets)
            if not split_glu:
                out.append(
                    ShardedTensor.from_rank_offsets(
                        ekey, t[e], *offsets, (tp_axis + prepend, tp_rank, tp_size),
                        replica_id=replica_id, prepend_axis_num=prepend,
                    )
                )
                continue
            w, v = torch.chunk(t[e], 2, dim=0)
            if singleton:
                parts = ((f"{ekey}_w", w, tp_rank, tp_size), (f"{ekey}_v", v, tp_rank, tp_size))
            else:
                parts = ((ekey, w, tp_rank, 2 * tp_size), (ekey, v, tp_rank + tp_size, 2 * tp_size))
            for k, data, rank, frag in parts:
                out.append(
                    ShardedTensor.from_rank_offsets(
                        k, data, *offsets, (prepend, rank, frag), replica_id=replica_id, prepend_axis_num=prepend
                    )
                )
        return out

    return build


def _make_merge_fn(split_glu: bool, data: Optional[torch.Tensor] = None):
    """The stacked weight from its loaded pieces. torch_dist loads into the pieces ``build`` made, which are
    views of ``data`` (the module's own weight): then ``data`` already holds the result and is returned as is,
    so a checkpoint load needs no second copy of the experts (the start-up peak the planner once had to
    count). Pieces that are not those views (another loader) are stacked into a new tensor."""

    def merge(parts: list[torch.Tensor]) -> torch.Tensor:
        if data is not None and _views_of(parts, data, split_glu):
            return data
        if split_glu:
            experts = [torch.cat((parts[i], parts[i + 1]), dim=0) for i in range(0, len(parts), 2)]
        else:
            experts = list(parts)
        return torch.stack(experts, dim=0)

    return merge


def _views_of(parts: list[torch.Tensor], data: torch.Tensor, split_glu: bool) -> bool:
    """Whether ``parts`` are exactly ``build``'s views of ``data``, in order (expert e, then its GLU halves)."""
    per = 2 if split_glu else 1
    if len(parts) != data.shape[0] * per or data.numel() == 0:
        return False
    base = data.untyped_storage().data_ptr()
    for i, part in enumerate(parts):
        e, half = divmod(i, per)
        want = torch.chunk(data[e], 2, dim=0)[half] if split_glu else data[e]
        if (part.untyped_storage().data_ptr() != base or part.storage_offset() != want.storage_offset()
                or part.shape != want.shape or part.stride() != want.stride()):
            return False
    return True
