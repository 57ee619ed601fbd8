"""Qwen3-Next as data: the architecture dims, the HF on-disk tensors, and the weight map to
megatron-core 0.19.2's ``torch_dist`` checkpoint keys.

Sources of the Megatron side (read, not copied): megatron-core 0.19.2
``ssm/gated_delta_net/common.py`` (GDN ``in_proj`` = [q, k, v, z, beta, alpha] sections, each
head-major, checkpointed as six keys ``in_proj.weight.{query,key,value,z,beta,alpha}`` by
``_split_tensor_factory``; ``conv1d.weight.{query,key,value}`` likewise), ``transformer/attention.py``
(``linear_qkv`` rows per query group: [q heads, gate heads, k, v] with ``attention_output_gate``),
``transformer/mlp.py`` (SwiGLU fc1 = [gate; up], TP-sharded as two halves by
``apply_swiglu_sharded_factory`` so the global tensor stays [gate; up]), ``transformer/moe/experts.py``
(routed experts checkpointed as ``mlp.experts.experts.linear_fc{1,2}.weight`` stacked on a leading
expert axis), ``transformer/transformer_block.py`` (hybrid models key layers by global index),
``transformer/multi_token_prediction.py`` (``mtp.layers.{k}.{enorm,hnorm,eh_proj,final_layernorm}``
+ ``transformer_layer``). The HF side is transformers 5.17's ``modeling_qwen3_next.py`` and the
hub checkpoints' on-disk names (per-expert tensors, ``mtp.*``).

Norms: HF ``Qwen3NextRMSNorm`` computes x_hat * (1 + w) and Megatron with
``layernorm_zero_centered_gamma`` does the same, so those weights are copied as they are. The GDN
output norm (HF ``Qwen3NextRMSNormGated``) is a plain x_hat * w norm initialised to ones, while
Megatron builds ``out_norm`` from the same zero-centered norm class: stored as w - 1.

Fused input norms: the names are Transformer Engine's (``in_proj.layer_norm_weight``,
``linear_qkv.layer_norm_weight``), which is what megatron-core's hybrid spec writes; a TE-free
stack with a separate ``input_layernorm`` maps to them through ``sharded_state_dict_keys_map``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator, Mapping as TMapping, Sequence

import torch

from ..errors import UserError
from .weight_map import (
    EXPERT_PARALLEL,
    REPLICATED,
    ExtraState,
    Mapping,
    Place,
    Rule,
    ShiftToZeroCentered,
    Site,
    SplitRows,
    Transform,
    expand,
    megatron_tensors,
)

MODEL_TYPE = "qwen3_next"
FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class Qwen3NextDims:
    """The sizes the weight map needs, read from an HF config.json (plus the MTP depth, which the
    config does not state: it is read off the checkpoint's ``mtp.layers.{k}`` names)."""

    hidden: int
    vocab: int
    layer_types: tuple[str, ...]
    moe_layers: tuple[bool, ...]
    num_heads: int  # attention query heads
    num_groups: int  # attention key/value heads (query groups)
    head_dim: int
    nk: int  # GDN key heads
    nv: int  # GDN value heads
    dk: int  # GDN key head dim
    dv: int  # GDN value head dim
    conv_kernel: int
    num_experts: int
    moe_ffn: int
    shared_ffn: int
    dense_ffn: int
    tied: bool
    mtp_layers: int = 0

    @classmethod
    def from_hf_config(cls, cfg: TMapping[str, Any], mtp_layers: int = 0) -> "Qwen3NextDims":
        if cfg.get("model_type") != MODEL_TYPE:
            raise UserError(
                f"config.json has model_type {cfg.get('model_type')!r}, expected {MODEL_TYPE!r}",
                hint="point at a Qwen3-Next checkpoint (Qwen3NextForCausalLM)",
            )
        try:
            n = int(cfg["num_hidden_layers"])
            types = cfg.get("layer_types")
            if types is None:
                interval = int(cfg.get("full_attention_interval", 4))
                types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(n)]
            num_experts = int(cfg.get("num_experts") or 0)
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            only_mlp = set(cfg.get("mlp_only_layers") or [])
            moe = [i not in only_mlp and num_experts > 0 and (i + 1) % step == 0 for i in range(n)]
            dims = cls(
                hidden=int(cfg["hidden_size"]),
                vocab=int(cfg["vocab_size"]),
                layer_types=tuple(types),
                moe_layers=tuple(moe),
                num_heads=int(cfg["num_attention_heads"]),
                num_groups=int(cfg["num_key_value_heads"]),
                head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])),
                nk=int(cfg["linear_num_key_heads"]),
                nv=int(cfg["linear_num_value_heads"]),
                dk=int(cfg["linear_key_head_dim"]),
                dv=int(cfg["linear_value_head_dim"]),
                conv_kernel=int(cfg["linear_conv_kernel_dim"]),
                num_experts=num_experts,
                moe_ffn=int(cfg.get("moe_intermediate_size") or 0),
                shared_ffn=int(cfg.get("shared_expert_intermediate_size") or 0),
                dense_ffn=int(cfg.get("intermediate_size") or 0),
                tied=bool(cfg.get("tie_word_embeddings", False)),
                mtp_layers=int(mtp_layers),
            )
        except KeyError as err:
            raise UserError(f"config.json lacks {err.args[0]!r}", hint="use the model's original config.json") from None
        if len(dims.layer_types) != n or set(dims.layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION}:
            raise UserError(f"config.json: layer_types must list {n} of full_attention/linear_attention")
        for what, a, b in (("num_attention_heads", dims.num_heads, dims.num_groups),
                           ("linear_num_value_heads", dims.nv, dims.nk)):
            if a % b:
                raise UserError(f"config.json: {what} ({a}) is not a multiple of the key/value heads ({b})")
        return dims

    # derived sizes
    @property
    def r(self) -> int:
        """GDN value heads per key head."""
        return self.nv // self.nk

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @property
    def qk_dim(self) -> int:
        return self.nk * self.dk

    @property
    def v_dim(self) -> int:
        return self.nv * self.dv


# ---------------------------------------------------------------------------------------------
# Transforms specific to Qwen3-Next's fused projections
# ---------------------------------------------------------------------------------------------


class GdnInProj(Transform):
    """HF ``in_proj_qkvz`` (rows grouped per key head g: [q_g, k_g, v_g, z_g], v_g/z_g holding the
    r value heads of g) and ``in_proj_ba`` (per g: [b_g, a_g]) <-> Megatron's six in_proj sections
    query, key, value, z, beta, alpha, each in plain head order."""

    def to_megatron(self, hf, d):
        qkvz, ba = hf
        rest = qkvz.shape[1:]
        g = qkvz.reshape(d.nk, 2 * d.dk + 2 * d.r * d.dv, *rest)
        q, k, v, z = torch.split(g, [d.dk, d.dk, d.r * d.dv, d.r * d.dv], dim=1)
        b, a = torch.split(ba.reshape(d.nk, 2 * d.r, *ba.shape[1:]), [d.r, d.r], dim=1)
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
        return [flat(q), flat(k), flat(v), flat(z), flat(b), flat(a)]

    def to_hf(self, mg, d):
        q, k, v, z, b, a = mg
        grp = lambda t: t.reshape(d.nk, -1, *t.shape[1:])  # noqa: E731
        qkvz = torch.cat([grp(q), grp(k), grp(v), grp(z)], dim=1)
        ba = torch.cat([grp(b), grp(a)], dim=1)
        return [qkvz.reshape(-1, *qkvz.shape[2:]), ba.reshape(-1, *ba.shape[2:])]


class GatedQkv(Transform):
    """HF ``q_proj`` (per head h: [query_h, gate_h]), ``k_proj``, ``v_proj`` <-> Megatron
    ``linear_qkv`` with attention_output_gate: per query group g
    [query heads of g, gate heads of g, key_g, value_g]."""

    def to_megatron(self, hf, d):
        q, k, v = hf
        rest = q.shape[1:]
        qg = q.reshape(d.num_groups, d.heads_per_group, 2, d.head_dim, *rest)
        query = qg[:, :, 0].reshape(d.num_groups, d.heads_per_group * d.head_dim, *rest)
        gate = qg[:, :, 1].reshape(d.num_groups, d.heads_per_group * d.head_dim, *rest)
        kg = k.reshape(d.num_groups, d.head_dim, *rest)
        vg = v.reshape(d.num_groups, d.head_dim, *rest)
        return [torch.cat([query, gate, kg, vg], dim=1).reshape(-1, *rest)]

    def to_hf(self, mg, d):
        (w,) = mg
        rest = w.shape[1:]
        hq = d.heads_per_group * d.head_dim
        g = w.reshape(d.num_groups, 2 * hq + 2 * d.head_dim, *rest)
        query, gate, k, v = torch.split(g, [hq, hq, d.head_dim, d.head_dim], dim=1)
        shape = (d.num_groups, d.heads_per_group, 1, d.head_dim, *rest)
        q = torch.cat([query.reshape(shape), gate.reshape(shape)], dim=2)
        return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


# GDN conv1d: HF channels are [q, k, v] (all heads each), as in Megatron; checkpointed as 3 keys.
_GDN_CONV = SplitRows(lambda d: [d.qk_dim, d.qk_dim, d.v_dim], "query, key, value")


def _fc1_half(part: int, ffn: str) -> Place:
    """One SwiGLU half (0 = gate_proj, 1 = up_proj) of a Megatron fc1 = [gate; up]."""
    return Place(
        global_shape=lambda d: (2 * getattr(d, ffn), d.hidden),
        offset=lambda d, e: (part * getattr(d, ffn), 0),
        what=("gate" if part == 0 else "up") + " half of fc1",
    )


def _expert(rows: str, part: int, halves: int, cols: str) -> Place:
    """Expert e's slot (leading axis) of a stacked expert tensor; fc1 holds [gate; up]."""
    return Place(
        global_shape=lambda d: (d.num_experts, halves * getattr(d, rows), getattr(d, cols)),
        offset=lambda d, e: (e, part * getattr(d, rows), 0),
        stack=True,
        what=f"expert slot{'' if halves == 1 else (' gate' if part == 0 else ' up')}",
    )


# ---------------------------------------------------------------------------------------------
# The table. Scopes: model (once), untied (once, when lm_head is separate), linear_attention /
# full_attention (by layer type: every decoder layer and the MTP block's inner layer), moe / dense
# (by MLP type), expert (every routed expert of an MoE layer), mtp (once per MTP block).
# {hf} / {mg}: the layer's prefix on each side, {e}: expert, {k}: MTP block.
# ---------------------------------------------------------------------------------------------

_GDN_SECTIONS = ("query", "key", "value", "z", "beta", "alpha")

WEIGHT_MAP: tuple[Rule, ...] = (
    # whole model
    Rule.of("model", "model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    Rule.of("model", "model.norm.weight", "decoder.final_layernorm.weight", split=REPLICATED),
    Rule.of("untied", "lm_head.weight", "output_layer.weight"),
    # Gated DeltaNet
    Rule.of("linear_attention", "{hf}.input_layernorm.weight", "{mg}.self_attention.in_proj.layer_norm_weight", split=REPLICATED),
    Rule.of("linear_attention",
            ("{hf}.linear_attn.in_proj_qkvz.weight", "{hf}.linear_attn.in_proj_ba.weight"),
            tuple(f"{{mg}}.self_attention.in_proj.weight.{s}" for s in _GDN_SECTIONS), GdnInProj()),
    Rule.of("linear_attention", "{hf}.linear_attn.conv1d.weight",
            tuple(f"{{mg}}.self_attention.conv1d.weight.{s}" for s in _GDN_SECTIONS[:3]), _GDN_CONV),
    Rule.of("linear_attention", "{hf}.linear_attn.dt_bias", "{mg}.self_attention.dt_bias"),
    Rule.of("linear_attention", "{hf}.linear_attn.A_log", "{mg}.self_attention.A_log"),
    Rule.of("linear_attention", "{hf}.linear_attn.norm.weight", "{mg}.self_attention.out_norm.weight",
            ShiftToZeroCentered(), note="HF plain RMSNorm (ones) -> Megatron zero-centered: w - 1", split=REPLICATED),
    Rule.of("linear_attention", "{hf}.linear_attn.out_proj.weight", "{mg}.self_attention.out_proj.weight"),
    # gated softmax attention
    Rule.of("full_attention", "{hf}.input_layernorm.weight", "{mg}.self_attention.linear_qkv.layer_norm_weight", split=REPLICATED),
    Rule.of("full_attention",
            ("{hf}.self_attn.q_proj.weight", "{hf}.self_attn.k_proj.weight", "{hf}.self_attn.v_proj.weight"),
            "{mg}.self_attention.linear_qkv.weight", GatedQkv()),
    Rule.of("full_attention", "{hf}.self_attn.q_norm.weight", "{mg}.self_attention.q_layernorm.weight", split=REPLICATED),
    Rule.of("full_attention", "{hf}.self_attn.k_norm.weight", "{mg}.self_attention.k_layernorm.weight", split=REPLICATED),
    Rule.of("full_attention", "{hf}.self_attn.o_proj.weight", "{mg}.self_attention.linear_proj.weight"),
    # sparse MoE: pre-MLP norm, router, routed experts, shared expert and its sigmoid gate
    Rule.of("moe", "{hf}.post_attention_layernorm.weight", "{mg}.pre_mlp_layernorm.weight", split=REPLICATED),
    Rule.of("moe", "{hf}.mlp.gate.weight", "{mg}.mlp.router.weight", split=REPLICATED),
    Rule.of("expert", "{hf}.mlp.experts.{e}.gate_proj.weight", "{mg}.mlp.experts.experts.linear_fc1.weight",
            _expert("moe_ffn", 0, 2, "hidden"), split=EXPERT_PARALLEL),
    Rule.of("expert", "{hf}.mlp.experts.{e}.up_proj.weight", "{mg}.mlp.experts.experts.linear_fc1.weight",
            _expert("moe_ffn", 1, 2, "hidden"), split=EXPERT_PARALLEL),
    Rule.of("expert", "{hf}.mlp.experts.{e}.down_proj.weight", "{mg}.mlp.experts.experts.linear_fc2.weight",
            _expert("hidden", 0, 1, "moe_ffn"), split=EXPERT_PARALLEL),
    Rule.of("moe", "{hf}.mlp.shared_expert.gate_proj.weight", "{mg}.mlp.shared_experts.linear_fc1.weight",
            _fc1_half(0, "shared_ffn")),
    Rule.of("moe", "{hf}.mlp.shared_expert.up_proj.weight", "{mg}.mlp.shared_experts.linear_fc1.weight",
            _fc1_half(1, "shared_ffn")),
    Rule.of("moe", "{hf}.mlp.shared_expert.down_proj.weight", "{mg}.mlp.shared_experts.linear_fc2.weight"),
    Rule.of("moe", "{hf}.mlp.shared_expert_gate.weight", "{mg}.mlp.shared_experts.gate_weight", split=REPLICATED),
    # dense MLP (layers in mlp_only_layers; none in the released models): TE fuses the pre-MLP norm
    Rule.of("dense", "{hf}.post_attention_layernorm.weight", "{mg}.mlp.linear_fc1.layer_norm_weight", split=REPLICATED),
    Rule.of("dense", "{hf}.mlp.gate_proj.weight", "{mg}.mlp.linear_fc1.weight", _fc1_half(0, "dense_ffn")),
    Rule.of("dense", "{hf}.mlp.up_proj.weight", "{mg}.mlp.linear_fc1.weight", _fc1_half(1, "dense_ffn")),
    Rule.of("dense", "{hf}.mlp.down_proj.weight", "{mg}.mlp.linear_fc2.weight"),
    # multi-token prediction block (carried through; Megatron's names with --mtp-num-layers 1)
    Rule.of("mtp", "mtp.pre_fc_norm_embedding.weight", "mtp.layers.{k}.enorm.weight", split=REPLICATED),
    Rule.of("mtp", "mtp.pre_fc_norm_hidden.weight", "mtp.layers.{k}.hnorm.weight", split=REPLICATED),
    Rule.of("mtp", "mtp.fc.weight", "mtp.layers.{k}.eh_proj.weight", note="input = [embedding; hidden] on both sides"),
    Rule.of("mtp", "mtp.norm.weight", "mtp.layers.{k}.final_layernorm.weight", split=REPLICATED),
)

# Megatron linear layers carry an (empty) ``_extra_state`` object in every checkpoint; a load that
# asks for one the checkpoint lacks fails, so the converter writes them. Module templates per scope.
EXTRA_STATE_MODULES: tuple[tuple[str, str], ...] = (
    ("linear_attention", "{mg}.self_attention.in_proj"),
    ("linear_attention", "{mg}.self_attention.out_proj"),
    ("full_attention", "{mg}.self_attention.linear_qkv"),
    ("full_attention", "{mg}.self_attention.linear_proj"),
    ("moe", "{mg}.mlp.shared_experts.linear_fc1"),
    ("moe", "{mg}.mlp.shared_experts.linear_fc2"),
    ("expert", "{mg}.mlp.experts.experts.linear_fc1"),
    ("expert", "{mg}.mlp.experts.experts.linear_fc2"),
    ("dense", "{mg}.mlp.linear_fc1"),
    ("dense", "{mg}.mlp.linear_fc2"),
    ("mtp", "mtp.layers.{k}.eh_proj"),
)


def hf_shape(template: str, d: Qwen3NextDims) -> tuple[int, ...]:
    """Shape of an HF on-disk tensor, by its name template (the HF side of the table)."""
    h = d.hidden
    suffix = template.split("}.", 1)[-1] if template.startswith("{") else template
    shapes = {
        "model.embed_tokens.weight": (d.vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (d.vocab, h),
        "post_attention_layernorm.weight": (h,),
        "input_layernorm.weight": (h,),
        "linear_attn.in_proj_qkvz.weight": (2 * d.qk_dim + 2 * d.v_dim, h),
        "linear_attn.in_proj_ba.weight": (2 * d.nv, h),
        "linear_attn.conv1d.weight": (2 * d.qk_dim + d.v_dim, 1, d.conv_kernel),
        "linear_attn.dt_bias": (d.nv,),
        "linear_attn.A_log": (d.nv,),
        "linear_attn.norm.weight": (d.dv,),
        "linear_attn.out_proj.weight": (h, d.v_dim),
        "self_attn.q_proj.weight": (2 * d.num_heads * d.head_dim, h),
        "self_attn.k_proj.weight": (d.num_groups * d.head_dim, h),
        "self_attn.v_proj.weight": (d.num_groups * d.head_dim, h),
        "self_attn.q_norm.weight": (d.head_dim,),
        "self_attn.k_norm.weight": (d.head_dim,),
        "self_attn.o_proj.weight": (h, d.num_heads * d.head_dim),
        "mlp.gate.weight": (d.num_experts, h),
        "mlp.experts.{e}.gate_proj.weight": (d.moe_ffn, h),
        "mlp.experts.{e}.up_proj.weight": (d.moe_ffn, h),
        "mlp.experts.{e}.down_proj.weight": (h, d.moe_ffn),
        "mlp.shared_expert.gate_proj.weight": (d.shared_ffn, h),
        "mlp.shared_expert.up_proj.weight": (d.shared_ffn, h),
        "mlp.shared_expert.down_proj.weight": (h, d.shared_ffn),
        "mlp.shared_expert_gate.weight": (1, h),
        "mlp.gate_proj.weight": (d.dense_ffn, h),
        "mlp.up_proj.weight": (d.dense_ffn, h),
        "mlp.down_proj.weight": (h, d.dense_ffn),
        "mtp.pre_fc_norm_embedding.weight": (h,),
        "mtp.pre_fc_norm_hidden.weight": (h,),
        "mtp.fc.weight": (h, 2 * h),
        "mtp.norm.weight": (h,),
    }
    return shapes[suffix]


def sites(d: Qwen3NextDims) -> Iterator[Site]:
    """Where each scope applies, in checkpoint order (embeddings, layers, final norm, head, MTP)."""
    yield Site("model", {})

    def layer(hf: str, mg: str, kind: str, moe: bool) -> Iterator[Site]:
        v = {"hf": hf, "mg": mg}
        yield Site(kind, v)
        yield Site("moe" if moe else "dense", v)
        if moe:
            for e in range(d.num_experts):
                yield Site("expert", {**v, "e": e})

    for i, kind in enumerate(d.layer_types):
        yield from layer(f"model.layers.{i}", f"decoder.layers.{i}", kind, d.moe_layers[i])
    if not d.tied:
        yield Site("untied", {})
    for k in range(d.mtp_layers):
        yield Site("mtp", {"k": k})
        yield from layer(f"mtp.layers.{k}", f"mtp.layers.{k}.transformer_layer", FULL_ATTENTION, d.num_experts > 0)


@dataclass
class Qwen3NextWeightMap:
    """The table expanded for one config: every HF tensor -> its Mapping, and the reverse."""

    dims: Qwen3NextDims
    mappings: list[Mapping]
    extra_states: list[ExtraState]

    @cached_property
    def by_hf(self) -> dict[str, Mapping]:
        return {name: m for m in self.mappings for name in m.hf}

    @cached_property
    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for m in self.mappings for name, shape in zip(m.hf, m.hf_shapes)}

    @cached_property
    def megatron_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Megatron checkpoint key with its global shape."""
        return megatron_tensors(self.mappings)


def build_weight_map(cfg: TMapping[str, Any], mtp_layers: int = 0, *, rules: Sequence[Rule] = WEIGHT_MAP,
                     extra_state_modules: Sequence[tuple[str, str]] = EXTRA_STATE_MODULES) -> Qwen3NextWeightMap:
    """Expand the table for an HF config (``mtp_layers``: MTP blocks present in the checkpoint).
    ``rules`` / ``extra_state_modules``: another Megatron-side layout of the same model (slime's,
    see ``qwen3_next_formats``); default megatron-core's native one."""
    d = Qwen3NextDims.from_hf_config(cfg, mtp_layers=mtp_layers)
    if mtp_layers > 1:
        raise UserError(f"{mtp_layers} MTP blocks found; the HF Qwen3-Next layout has names for one")
    site_list = list(sites(d))
    mappings = expand(rules, site_list, d, hf_shape)
    extra = []
    templates: dict[str, list[str]] = {}
    for scope, t in extra_state_modules:
        templates.setdefault(scope, []).append(t)
    for site in site_list:
        for t in templates.get(site.scope, []):
            module = t.format(**site.vars)
            if site.scope == "expert":
                shard = f"shard_{site.vars['e']}_{d.num_experts}"
            else:
                shard = "shard_0_1"
            extra.append(ExtraState(f"{module}._extra_state/{shard}"))
    return Qwen3NextWeightMap(d, mappings, extra)


def hf_to_megatron_modules(rules: Sequence[Rule] = WEIGHT_MAP) -> dict[str, str]:
    """HF linear layer (layer-relative, e.g. ``self_attn.q_proj``, ``mlp.experts.{e}.up_proj``) ->
    the Megatron checkpoint key prefix of the weight it becomes (``self_attention.linear_qkv``),
    read off the table. For LoRA: targets are named in HF terms, adapters live on Megatron's
    linears. Routed experts map to the stacked key ``mlp.experts.experts.linear_fc1``, whose
    modules are ``mlp.experts.linear_fc1`` (grouped) or ``mlp.experts.local_experts.{i}.linear_fc1``."""
    out: dict[str, str] = {}
    for r in rules:
        for hf in r.hf:
            if not (hf.startswith("{hf}.") and hf.endswith(".weight")) or "norm" in hf:
                continue
            mg = r.mg[0]
            if not mg.startswith("{mg}.") or ".weight" not in mg:  # e.g. shared_experts.gate_weight
                continue
            module = mg[len("{mg}."):mg.index(".weight")]
            if module.endswith(("router", "conv1d")):  # not linear layers LoRA adapts
                continue
            out[hf[len("{hf}."):-len(".weight")]] = module
    return out


def mtp_layers_in(names: Sequence[str] | TMapping[str, Any]) -> int:
    """How many MTP blocks an HF checkpoint carries (0 when it has no ``mtp.*`` tensors)."""
    ks = {int(m.group(1)) for n in names if (m := re.match(r"mtp\.layers\.(\d+)\.", n))}
    if ks:
        return max(ks) + 1
    return 1 if any(n.startswith("mtp.") for n in names) else 0
