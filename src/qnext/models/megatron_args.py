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
parallel sizes, batch sizes and learning rates belong to the caller.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .qwen3_next import FULL_ATTENTION, Qwen3NextDims


def _rope(cfg: Mapping[str, Any]) -> tuple[float, float]:
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    return float(theta), float(partial)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def model_args(cfg: Mapping[str, Any], *, mtp: bool = False, slime: bool = False) -> list[tuple[str, str | None]]:
    """(flag, value) pairs; value None for a switch. ``mtp``: also build the MTP block;
    ``slime``: slime's flags (its spec for the linear-attention layers, a list ``--moe-layer-freq``)."""
    d = Qwen3NextDims.from_hf_config(cfg)
    theta, partial = _rope(cfg)
    la_pattern = [0 if t == FULL_ATTENTION else 1 for t in d.layer_types]
    interval = cfg.get("full_attention_interval")
    if interval and la_pattern == [0 if (i + 1) % int(interval) == 0 else 1 for i in range(len(la_pattern))]:
        la_freq = str(int(interval))
    else:
        la_freq = "[" + ",".join(map(str, la_pattern)) + "]"
    moe_freq = "[" + ",".join("1" if m else "0" for m in d.moe_layers) + "]"
    if all(d.moe_layers) and not slime:
        moe_freq = "1"
    args: list[tuple[str, str | None]] = [("--spec", SLIME_SPEC)] if slime else []
    args += [
        ("--num-layers", str(len(d.layer_types))),
        ("--hidden-size", str(d.hidden)),
        ("--ffn-hidden-size", str(d.dense_ffn)),
        ("--num-attention-heads", str(d.num_heads)),
        ("--group-query-attention", None),
        ("--num-query-groups", str(d.num_groups)),
        ("--kv-channels", str(d.head_dim)),
        ("--attention-output-gate", None),
        *([("--use-gated-attention", None)] if slime else []),
        ("--qk-layernorm", None),
        ("--normalization", "RMSNorm"),
        ("--apply-layernorm-1p", None),
        ("--norm-epsilon", f"{float(cfg.get('rms_norm_eps', 1e-6)):g}"),
        ("--position-embedding-type", "rope"),
        ("--rotary-percent", _num(partial)),
        ("--rotary-base", _num(theta)),
        ("--max-position-embeddings", str(cfg.get("max_position_embeddings", 4096))),
        ("--swiglu", None),
        ("--disable-bias-linear", None),
        ("--vocab-size", str(d.vocab)),
        ("--attention-dropout", _num(cfg.get("attention_dropout", 0.0) or 0.0)),
        ("--hidden-dropout", "0"),
    ]
    if not slime:  # slime's spec builds the linear-attention layers from the HF config instead
        args += [
            ("--experimental-attention-variant", "gated_delta_net"),
            ("--linear-attention-freq", la_freq),
            ("--linear-conv-kernel-dim", str(d.conv_kernel)),
            ("--linear-key-head-dim", str(d.dk)),
            ("--linear-value-head-dim", str(d.dv)),
            ("--linear-num-key-heads", str(d.nk)),
            ("--linear-num-value-heads", str(d.nv)),
        ]
    if not d.tied:
        args.append(("--untie-embeddings-and-output-weights", None))
    if d.num_experts:
        args += [
            ("--num-experts", str(d.num_experts)),
            ("--moe-ffn-hidden-size", str(d.moe_ffn)),
            ("--moe-router-topk", str(cfg.get("num_experts_per_tok", 1))),
            ("--moe-router-score-function", "softmax"),
            ("--moe-layer-freq", moe_freq),
            ("--moe-router-dtype", "fp32"),
            ("--moe-aux-loss-coeff", _num(cfg.get("router_aux_loss_coef", 0.0))),
            ("--moe-grouped-gemm", None),
            ("--moe-token-dispatcher-type", "alltoall"),
        ]
        if not cfg.get("norm_topk_prob", True):
            # HF then keeps the softmax over all experts: Megatron's pre-softmax routing
            args.append(("--moe-router-pre-softmax", None))
        if d.shared_ffn:
            args += [("--moe-shared-expert-intermediate-size", str(d.shared_ffn)), ("--moe-shared-expert-gate", None)]
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


def bridge_model_config(cfg: Mapping[str, Any], *, mtp: bool = False, hf_model_id: str | None = None) -> dict[str, Any]:
    """The ``model`` section of Megatron-Bridge's ``run_config.yaml`` for our layout: its GPT
    provider's field names (TransformerConfig's), the values of ``model_args``, at TP = PP = 1 (a
    converted checkpoint is not sharded; Bridge compares these with the run's sizes only to decide
    whether to load RNG and optimizer state, which a release checkpoint does not have)."""
    d = Qwen3NextDims.from_hf_config(cfg)
    a = dict(model_args(cfg))
    theta, partial = _rope(cfg)
    out: dict[str, Any] = {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        "transformer_layer_spec": {
            "_target_": "megatron.core.models.gpt.experimental_attention_variant_module_specs."
                        "get_transformer_block_with_experimental_attention_variant_spec",
            "_call_": False,
        },
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "num_layers": len(d.layer_types), "hidden_size": d.hidden, "ffn_hidden_size": d.dense_ffn,
        "num_attention_heads": d.num_heads, "num_query_groups": d.num_groups, "kv_channels": d.head_dim,
        "vocab_size": d.vocab, "seq_length": int(cfg.get("max_position_embeddings", 4096)),
        "normalization": "RMSNorm", "layernorm_zero_centered_gamma": True,
        "layernorm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "gated_linear_unit": True, "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": True,
        "attention_output_gate": True, "position_embedding_type": "rope", "rotary_percent": partial,
        "rotary_base": theta, "share_embeddings_and_output_weights": d.tied,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "experimental_attention_variant": "gated_delta_net",
        "linear_attention_freq": int(a["--linear-attention-freq"]) if a["--linear-attention-freq"].isdigit()
        else [int(x) for x in a["--linear-attention-freq"].strip("[]").split(",")],
        "linear_conv_kernel_dim": d.conv_kernel, "linear_key_head_dim": d.dk, "linear_value_head_dim": d.dv,
        "linear_num_key_heads": d.nk, "linear_num_value_heads": d.nv,
        "hetereogenous_dist_checkpoint": True,  # Bridge's (sic) field for mixed layer types
        "mtp_num_layers": 1 if mtp else None,
    }
    if d.num_experts:
        out.update({
            "num_moe_experts": d.num_experts, "moe_ffn_hidden_size": d.moe_ffn,
            "moe_router_topk": int(cfg.get("num_experts_per_tok", 1)), "moe_router_score_function": "softmax",
            "moe_router_pre_softmax": "--moe-router-pre-softmax" in a, "moe_router_dtype": "fp32",
            "moe_aux_loss_coeff": float(cfg.get("router_aux_loss_coef", 0.0)), "moe_grouped_gemm": True,
            "moe_token_dispatcher_type": "alltoall",
            "moe_layer_freq": 1 if all(d.moe_layers) else [int(m) for m in d.moe_layers],
            "moe_shared_expert_intermediate_size": d.shared_ffn or None, "moe_shared_expert_gate": bool(d.shared_ffn),
        })
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
