"""Megatron-LM / slime ``MODEL_ARGS`` for a Qwen3-Next HF config (``models/<name>.sh``).

The flags select megatron-core's native Qwen3-Next pieces (Gated DeltaNet through
``--experimental-attention-variant gated_delta_net``, gated attention, zero-centered RMSNorm,
MoE with a gated shared expert), so that ``--load`` of a ``make convert`` checkpoint builds the
same keys. Only architecture and the MoE kernels slime's own script uses; parallel sizes,
batch sizes and learning rates belong to the caller.
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


def model_args(cfg: Mapping[str, Any], *, mtp: bool = False) -> list[tuple[str, str | None]]:
    """(flag, value) pairs; value None for a switch. ``mtp``: also build the MTP block."""
    d = Qwen3NextDims.from_hf_config(cfg)
    theta, partial = _rope(cfg)
    la_pattern = [0 if t == FULL_ATTENTION else 1 for t in d.layer_types]
    interval = cfg.get("full_attention_interval")
    if interval and la_pattern == [0 if (i + 1) % int(interval) == 0 else 1 for i in range(len(la_pattern))]:
        la_freq = str(int(interval))
    else:
        la_freq = "[" + ",".join(map(str, la_pattern)) + "]"
    moe_freq = "1" if all(d.moe_layers) else "[" + ",".join("1" if m else "0" for m in d.moe_layers) + "]"
    args: list[tuple[str, str | None]] = [
        ("--num-layers", str(len(d.layer_types))),
        ("--hidden-size", str(d.hidden)),
        ("--ffn-hidden-size", str(d.dense_ffn)),
        ("--num-attention-heads", str(d.num_heads)),
        ("--group-query-attention", None),
        ("--num-query-groups", str(d.num_groups)),
        ("--kv-channels", str(d.head_dim)),
        ("--attention-output-gate", None),
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


def flat_args(cfg: Mapping[str, Any], **kw) -> list[str]:
    """The flags as an argv list."""
    out: list[str] = []
    for flag, value in model_args(cfg, **kw):
        out.append(flag)
        if value is not None:
            out.append(value)
    return out


def render_sh(name: str, config_path: str, cfg: Mapping[str, Any]) -> str:
    lines = [
        f"# Megatron-LM / slime MODEL_ARGS for {name}. Generated from {config_path} by `make model-args`",
        "# (tools/gen_model_args.py); edit the generator, not this file.",
        "# Use: source models/" + f"{name}.sh" + '; torchrun ... pretrain_gpt.py "${MODEL_ARGS[@]}" --load <make convert output> ...',
        "# The converted checkpoint also carries the MTP block (mtp.layers.0.*): add --mtp-num-layers 1 to train it.",
        "MODEL_ARGS=(",
    ]
    for flag, value in model_args(cfg):
        v = "" if value is None else " " + (f'"{value}"' if value.startswith("[") else value)
        lines.append(f"   {flag}{v}")
    lines.append(")")
    return "\n".join(lines) + "\n"


def registry(models_dir: str | Path) -> dict[str, Path]:
    """Every supported model: ``models/<name>/config.json`` of a Qwen3-Next architecture."""
    out = {}
    for cfg_path in sorted(Path(models_dir).glob("*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("model_type") == "qwen3_next":
            out[cfg_path.parent.name] = cfg_path
    return out
