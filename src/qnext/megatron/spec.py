"""The hybrid Qwen3-Next layer stack as a megatron-core block spec, with two back ends.

- ``te``: Transformer Engine modules, built by megatron-core's own hybrid builder
  (``get_transformer_block_with_experimental_attention_variant_spec``): input norms fused into
  ``TELayerNormColumnParallelLinear`` (GDN ``in_proj``, attention ``linear_qkv``, dense ``linear_fc1``),
  ``TEDotProductAttention``, ``TENorm`` for q/k/out norms, ``TEGroupedMLP`` experts.
- ``local``: no Transformer Engine. Separate zero-centered :class:`~qnext.megatron.norm.RMSNorm`
  input norms, ``ColumnParallelLinear``/``RowParallelLinear``, :class:`SDPAttention` and
  :class:`GroupedGemmExperts`, the shared expert with its sigmoid gate; MoE layers whose experts are
  all on this GPU dispatch tokens with :class:`~qnext.megatron.dispatch.SortedTokenDispatcher`, and
  Gated DeltaNet hands q/k normalisation and grouped value heads to fla
  (:class:`~qnext.megatron.gdn.QnextGatedDeltaNet`).

Both back ends write the same checkpoint: the local layers rename their separate norms to the TE
names in ``sharded_state_dict`` (``input_layernorm.weight`` -> ``self_attention.in_proj.layer_norm_weight``
or ``self_attention.linear_qkv.layer_norm_weight``; a dense layer's ``pre_mlp_layernorm.weight`` ->
``mlp.linear_fc1.layer_norm_weight``), exactly as megatron's own local GPT spec does, and the experts
keep ``SequentialMLP``'s layout. (TE modules add ``_extra_state`` objects that the local stack has
no counterpart for; :func:`qnext.megatron.model.load_torch_dist` tolerates their absence.)

The back end is chosen at run time: TE when ``transformer_engine`` imports, unless told otherwise.
"""
from __future__ import annotations

import importlib.util
import logging
from functools import partial
from typing import Optional

from ..errors import UserError

logger = logging.getLogger(__name__)

TE = "te"
LOCAL = "local"


def te_importable() -> bool:
    """True when Transformer Engine and megatron's TE extension both import."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401

        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception as err:  # a broken TE install counts as no TE, and says why
        logger.warning("transformer_engine is installed but does not import (%s); using the TE-free stack", err)
        return False
    return bool(HAVE_TE)


def select_backend(use_te: Optional[bool] = None, *, te_available: Optional[bool] = None) -> str:
    """``te`` or ``local``. ``use_te=None`` picks TE when it imports; ``True`` requires it."""
    available = te_importable() if te_available is None else te_available
    if use_te is None:
        backend = TE if available else LOCAL
        reason = "transformer_engine imports" if available else "transformer_engine is not importable"
    elif use_te:
        if not available:
            raise UserError(
                "use_te=True but transformer_engine does not import here",
                hint="install transformer-engine[pytorch] (NGC containers ship it) or leave use_te unset",
            )
        backend, reason = TE, "requested"
    else:
        backend, reason = LOCAL, "requested"
    logger.info("Megatron layer spec: %s back end (%s)", "Transformer Engine" if backend == TE else "TE-free", reason)
    return backend


# ---------------------------------------------------------------------------------------------- local
def _local_norm():
    from .norm import RMSNorm

    return RMSNorm


def _local_gdn_layer(config, mlp, mlp_is_dense: bool):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from .gdn import QnextGatedDeltaNet

    norm = _local_norm()
    keys_map = {"input_layernorm.": "self_attention.in_proj.layer_norm_"}
    if mlp_is_dense:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=QnextGatedDeltaNet,
                submodules=GatedDeltaNetSubmodules(
                    in_proj=ColumnParallelLinear, out_norm=norm, out_proj=RowParallelLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def _local_attention_layer(config, mlp, mlp_is_dense: bool):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from .attention import SDPAttention

    norm = _local_norm()
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if mlp_is_dense:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=norm if config.qk_layernorm else IdentityOp,
                    k_layernorm=norm if config.qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def _local_moe():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    from .dispatch import QnextMoELayer
    from .experts import GroupedGemmExperts

    def shared_experts(*, config, pg_collection, gate, name=None):
        return SharedExpertMLP(
            config=config,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            gate=gate,
            pg_collection=pg_collection,
            name=name,
        )

    return partial(QnextMoELayer, submodules=MoESubmodules(experts=GroupedGemmExperts, shared_experts=shared_experts))


def _local_dense_mlp():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    return partial(
        MLP.as_mlp_submodule,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )


def local_layer_specs(config) -> list:
    """One ModuleSpec per layer (all layers of the model), TE-free."""
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_linear_attention_pattern,
        get_moe_layer_pattern,
    )

    attn_pattern = get_linear_attention_pattern(config)
    moe_pattern = get_moe_layer_pattern(config) if config.num_moe_experts else [0] * config.num_layers
    moe, dense = _local_moe() if any(moe_pattern) else None, _local_dense_mlp()
    specs = []
    for i in range(config.num_layers):
        is_moe = bool(moe_pattern[i])
        mlp = moe if is_moe else dense
        build = _local_gdn_layer if attn_pattern[i] == 1 else _local_attention_layer
        specs.append(build(config, mlp, mlp_is_dense=not is_moe))
    return specs


def local_block_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """The TE-free ``TransformerBlockSubmodules`` for this pipeline stage's layers."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    from megatron.core.transformer.enums import LayerType

    specs = local_layer_specs(config)
    if config.pipeline_model_parallel_layout is not None:
        ids = config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank
        )
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        ids = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank))
    return TransformerBlockSubmodules(layer_specs=[specs[i] for i in ids], layer_norm=_local_norm())


def block_spec(config, backend: str, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """The decoder block spec of ``backend`` (``te`` | ``local``) for this pipeline stage."""
    if backend == TE:
        from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
        )

        if config.transformer_impl != "transformer_engine":
            raise ValueError("the TE spec needs config.transformer_impl='transformer_engine'")
        return get_transformer_block_with_experimental_attention_variant_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if backend == LOCAL:
        return local_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
    raise ValueError(f"unknown back end {backend!r} (te | local)")
