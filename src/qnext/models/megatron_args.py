"""Megatron-LM and slime ``MODEL_ARGS`` for a Qwen3-Next HF config (``models/<name>.sh``,
``models/<name>.slime.sh``), and the model section of Megatron-Bridge's ``run_config.yaml``.

The Megatron-LM flags select megatron-core's native Qwen3-Next pieces (Gated DeltaNet through
``--experimental-attention-variant gated_delta_net``, gated attention, zero-centered RMSNorm,
MoE with a gated shared expert), so that ``--load`` of a ``make convert`` checkpoint builds the
same keys. slime's flags (read at THUDM/slime 624b824, ``scripts/models/qwen3-next-80B-A3B.sh``
and ``slime_plugins/models/qwen3_next.py``) build the linear-attention layers through slime's
``--spec`` instead (its provider refuses ``--experimental-attention-variant``; the layer types
come from the HF config named by ``--hf-checkpoint``) and give ``--moe-layer-freq`` as a list;
they load ``make convert ARGS="--format slime"`` checkpoints. Both set dropout to zero explicitly
(the HF config has none; Megatron's defaults are 0.1). Only architecture and the MoE kernels;
parallel sizes, batch sizes and learning rates belong to the caller. Every value is read off the
``TransformerConfig`` that ``qnext.megatron.config.hf_to_transformer_config`` builds (the one
translation of an HF config; RoPE, layer patterns and MoE routing are decided there only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping



def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _pattern(value) -> str:
    return str(int(value)) if isinstance(value, int) else "[" + ",".join(str(int(v)) for v in value) + "]"


def model_args(cfg: Mapping[str, Any], *, mtp: bool = False, slime: bool = False) -> list[tuple[str, str | None]]:
    """(flag, value) pairs; value None for a switch. ``mtp``: also build the MTP block;
    ``slime``: slime's flags (its spec for the linear-attention layers, a list ``--moe-layer-freq``).

    Every value is read off the ``TransformerConfig`` and GPT arguments that ``qnext.megatron.config.
    hf_to_transformer_config`` builds for this HF config (Transformer Engine layers, as a Megatron-LM or
    slime user runs them): one translation of the HF config, the flags derived from it, so the flags and
    qnext's own model cannot disagree (``tests/integration/test_model_args_megatron.py`` also parses them
    with megatron's parser and compares with the config)."""
    import torch

    from ..megatron.config import hf_to_transformer_config

    m = hf_to_transformer_config(cfg, None, torch.bfloat16, use_te=True)
    c = m.config
    on = lambda flag, cond: [(flag, None)] if cond else []  # noqa: E731
    args: list[tuple[str, str | None]] = [("--spec", SLIME_SPEC)] if slime else []
    args += [
        ("--num-layers", str(c.num_layers)),
        ("--hidden-size", str(c.hidden_size)),
        ("--ffn-hidden-size", str(c.ffn_hidden_size)),
        ("--num-attention-heads", str(c.num_attention_heads)),
        ("--group-query-attention", None),
        ("--num-query-groups", str(c.num_query_groups)),
        ("--kv-channels", str(c.kv_channels)),
        *on("--attention-output-gate", c.attention_output_gate),
        *on("--use-gated-attention", slime and c.attention_output_gate),
        *on("--qk-layernorm", c.qk_layernorm),
        ("--normalization", c.normalization),
        *on("--apply-layernorm-1p", c.layernorm_zero_centered_gamma),
        ("--norm-epsilon", f"{float(c.layernorm_epsilon):g}"),
        ("--position-embedding-type", m.position_embedding_type),
        ("--rotary-percent", _num(m.rotary_percent)),
        ("--rotary-base", _num(m.rotary_base)),
        ("--max-position-embeddings", str(m.max_sequence_length)),
        *on("--swiglu", c.gated_linear_unit and c.activation_func.__name__ == "silu"),
        *on("--disable-bias-linear", not c.add_bias_linear),
        ("--vocab-size", str(m.vocab_size)),
        ("--attention-dropout", _num(c.attention_dropout)),
        ("--hidden-dropout", _num(c.hidden_dropout)),
    ]
    if not slime:  # slime's spec builds the linear-attention layers from the HF config instead
        args += [
            ("--experimental-attention-variant", c.experimental_attention_variant),
            ("--linear-attention-freq", _pattern(c.linear_attention_freq)),
            ("--linear-conv-kernel-dim", str(c.linear_conv_kernel_dim)),
            ("--linear-key-head-dim", str(c.linear_key_head_dim)),
            ("--linear-value-head-dim", str(c.linear_value_head_dim)),
            ("--linear-num-key-heads", str(c.linear_num_key_heads)),
            ("--linear-num-value-heads", str(c.linear_num_value_heads)),
        ]
    if not m.share_embeddings_and_output_weights:
        args.append(("--untie-embeddings-and-output-weights", None))
    if c.num_moe_experts:
        freq = c.moe_layer_freq
        if slime and isinstance(freq, int):  # slime passes the per-layer list
            from .qwen3_next import Qwen3NextDims

            freq = [1 if moe else 0 for moe in Qwen3NextDims.from_hf_config(cfg).moe_layers]
        args += [
            ("--num-experts", str(c.num_moe_experts)),
            ("--moe-ffn-hidden-size", str(c.moe_ffn_hidden_size)),
            ("--moe-router-topk", str(c.moe_router_topk)),
            ("--moe-router-score-function", c.moe_router_score_function),
            ("--moe-layer-freq", _pattern(freq)),
            # None (the model dtype, as transformers computes the router): megatron's default, no flag
            *([("--moe-router-dtype", c.moe_router_dtype)] if c.moe_router_dtype else []),
            ("--moe-aux-loss-coeff", _num(c.moe_aux_loss_coeff)),
            *on("--moe-grouped-gemm", c.moe_grouped_gemm),
            ("--moe-token-dispatcher-type", c.moe_token_dispatcher_type),
        ]
        # HF without norm_topk_prob keeps the softmax over all experts: Megatron's pre-softmax routing
        args += on("--moe-router-pre-softmax", c.moe_router_pre_softmax)
        if c.moe_shared_expert_intermediate_size:
            args.append(("--moe-shared-expert-intermediate-size", str(c.moe_shared_expert_intermediate_size)))
            args += on("--moe-shared-expert-gate", c.moe_shared_expert_gate)
    if mtp:
        args.append(("--mtp-num-layers", "1"))
    return args


SLIME_SPEC = "slime_plugins.models.qwen3_next get_qwen3_next_spec"  # module and function: two argv words


def flat_args(cfg: Mapping[str, Any], **kw) -> list[str]:
    """The flags as an argv list."""
    out: list[str] = []
    for flag, value in model_args(cfg, **kw):
        out.append(flag)
        if value is not None:
            out += value.split(" ") if flag == "--spec" else [value]
    return out


def _quote(flag: str, value: str | None) -> str:
    if value is None:
        return ""
    if flag == "--spec":
        return " " + " ".join(f'"{w}"' for w in value.split(" "))
    return " " + (f'"{value}"' if value.startswith("[") else value)


def render_sh(name: str, config_path: str, cfg: Mapping[str, Any]) -> str:
    lines = [
        f"# Megatron-LM MODEL_ARGS for {name}. Generated from {config_path} by `make model-args`",
        "# (tools/gen_model_args.py); edit the generator, not this file. slime users: models/" + f"{name}.slime.sh.",
        "# Use: source models/" + f"{name}.sh" + '; torchrun ... pretrain_gpt.py "${MODEL_ARGS[@]}" --load <make convert output> ...',
        "# The converted checkpoint also carries the MTP block (mtp.layers.0.*): add --mtp-num-layers 1 to train it.",
        "MODEL_ARGS=(",
    ]
    lines += [f"   {flag}{_quote(flag, value)}" for flag, value in model_args(cfg)]
    lines.append(")")
    return "\n".join(lines) + "\n"


def render_slime_sh(name: str, config_path: str, cfg: Mapping[str, Any]) -> str:
    lines = [
        f"# slime MODEL_ARGS for {name}. Generated from {config_path} by `make model-args`",
        "# (tools/gen_model_args.py); edit the generator, not this file. Flags as slime's own",
        "# scripts/models/qwen3-next-80B-A3B.sh (THUDM/slime 624b824) uses them, plus explicit zero dropout.",
        "# Use: source models/" + f"{name}.slime.sh" + " in a slime run script, with --hf-checkpoint <HF dir> (slime's spec",
        '# reads the layer types from its config.json) and --load <make convert ARGS="--format slime" output>.',
        "# The converted checkpoint also carries the MTP block (mtp.layers.0.*): add --mtp-num-layers 1 to train it.",
        "MODEL_ARGS=(",
    ]
    lines += [f"   {flag}{_quote(flag, value)}" for flag, value in model_args(cfg, slime=True)]
    lines.append(")")
    return "\n".join(lines) + "\n"


# TransformerConfig fields Megatron-Bridge's GPT provider takes from run_config.yaml, copied from ours
_BRIDGE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "normalization", "layernorm_zero_centered_gamma", "layernorm_epsilon", "gated_linear_unit", "add_bias_linear",
    "add_qkv_bias", "qk_layernorm", "attention_output_gate", "hidden_dropout", "attention_dropout",
    "experimental_attention_variant", "linear_attention_freq", "linear_conv_kernel_dim", "linear_key_head_dim",
    "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
)
_BRIDGE_MOE_FIELDS = (
    "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax",
    "moe_router_dtype", "moe_aux_loss_coeff", "moe_grouped_gemm", "moe_token_dispatcher_type", "moe_layer_freq",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
)


def bridge_model_config(cfg: Mapping[str, Any], *, mtp: bool = False, hf_model_id: str | None = None) -> dict[str, Any]:
    """The ``model`` section of Megatron-Bridge's ``run_config.yaml`` for our layout: its GPT
    provider's field names (TransformerConfig's), read off the same ``TransformerConfig`` as
    ``model_args`` (Transformer Engine layers), at TP = PP = 1 (a converted checkpoint is not sharded;
    Bridge compares these with the run's sizes only to decide whether to load RNG and optimizer state,
    which a release checkpoint does not have)."""
    import torch

    from ..megatron.config import hf_to_transformer_config

    m = hf_to_transformer_config(cfg, None, torch.bfloat16, use_te=True)
    c = m.config
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    out: dict[str, Any] = {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        "transformer_layer_spec": {
            "_target_": "megatron.core.models.gpt.experimental_attention_variant_module_specs."
                        "get_transformer_block_with_experimental_attention_variant_spec",
            "_call_": False,
        },
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        **{f: plain(getattr(c, f)) for f in _BRIDGE_FIELDS},
        "vocab_size": m.vocab_size, "seq_length": m.max_sequence_length,
        "position_embedding_type": m.position_embedding_type, "rotary_percent": m.rotary_percent,
        "rotary_base": m.rotary_base, "share_embeddings_and_output_weights": m.share_embeddings_and_output_weights,
        "hetereogenous_dist_checkpoint": True,  # Bridge's (sic) field for mixed layer types
        "mtp_num_layers": 1 if mtp else None,
    }
    if c.num_moe_experts:
        out.update({f: plain(getattr(c, f)) for f in _BRIDGE_MOE_FIELDS})
    if hf_model_id:
        out["hf_model_id"] = hf_model_id
    return out


def registry(models_dir: str | Path) -> dict[str, Path]:
    """Every supported model: ``models/<name>/config.json`` of a Qwen3-Next architecture."""
    out = {}
    for cfg_path in sorted(Path(models_dir).glob("*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("model_type") == "qwen3_next":
            out[cfg_path.parent.name] = cfg_path
    return out
