"""HF Qwen3-Next config -> megatron-core ``TransformerConfig`` (+ the GPTModel arguments).

Qwen3-Next maps onto megatron-core 0.19.2 as:
- token mixers: Gated DeltaNet (``experimental_attention_variant="gated_delta_net"``) on the layers
  whose HF ``layer_types`` entry is ``linear_attention``, gated softmax attention
  (``attention_output_gate``, q/k RMSNorm) on the ``full_attention`` ones;
- every RMSNorm is zero-centered (y = x_hat * (1 + w); ``layernorm_zero_centered_gamma``);
- MoE with softmax top-k routing, a shared expert and its sigmoid gate. HF's router takes the softmax
  over all experts, then the top k, then (``norm_topk_prob``) renormalises; Megatron's
  ``moe_router_pre_softmax=False`` takes the top k logits and a softmax over them, which is the same
  function. Without ``norm_topk_prob`` the probabilities are not renormalised: ``pre_softmax=True``.
- RoPE on a quarter of each head (``rotary_percent=partial_rotary_factor``), untied embeddings.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import UserError
from .fused import fused_enabled

HFConfig = Mapping[str, Any]

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel sizes. Data parallelism is whatever is left of the world."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    sequence_parallel: bool = False

    @classmethod
    def of(cls, parallel: Any) -> "ParallelSizes":
        """Accept a ParallelSizes, the recipe's ParallelConfig, a dict or None (all ones)."""
        if parallel is None:
            return cls()
        if isinstance(parallel, cls):
            return parallel
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(parallel, Mapping):
            return cls(**{k: parallel[k] for k in names if k in parallel})
        return cls(**{k: getattr(parallel, k) for k in names if hasattr(parallel, k)})


@dataclass
class MegatronModelArgs:
    """Everything ``GPTModel`` needs besides the layer spec."""

    config: Any  # megatron.core.transformer.TransformerConfig
    vocab_size: int
    max_sequence_length: int
    rotary_percent: float
    rotary_base: float
    share_embeddings_and_output_weights: bool
    position_embedding_type: str = "rope"
    extra: dict[str, Any] = field(default_factory=dict)

    def gpt_kwargs(self) -> dict[str, Any]:
        return dict(
            vocab_size=self.vocab_size,
            max_sequence_length=self.max_sequence_length,
            position_embedding_type=self.position_embedding_type,
            rotary_percent=self.rotary_percent,
            rotary_base=self.rotary_base,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            **self.extra,
        )


def load_hf_config(hf_config: HFConfig | str | Path) -> dict[str, Any]:
    """A config.json path, a checkpoint directory holding one, or an already-loaded dict."""
    if isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
    else:
        path = Path(hf_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"HF config {path} not found", hint="pass a config.json or a checkpoint directory")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})", hint="fix the file") from None
    if hasattr(cfg, "to_dict"):  # a transformers PretrainedConfig
        cfg = cfg.to_dict()
    if cfg.get("model_type") != "qwen3_next":
        raise UserError(
            f"model_type is {cfg.get('model_type')!r}, expected 'qwen3_next'",
            hint="this Megatron model implements Qwen3-Next only",
        )
    return cfg


def _rope(cfg: HFConfig) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor); transformers 5 may nest them in rope_parameters."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UserError(
            f"rope type {rope_type!r} is not supported by the Megatron Qwen3-Next model",
            hint="use a config with plain RoPE (rope_scaling: null)",
        )
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    return float(theta), float(partial)


def layer_types(cfg: HFConfig) -> list[str]:
    """HF ``layer_types`` (``linear_attention`` / ``full_attention`` per layer)."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        interval = int(cfg.get("full_attention_interval", 4))
        types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(n)]
    types = list(types)
    if len(types) != n or any(t not in (FULL_ATTENTION, LINEAR_ATTENTION) for t in types):
        raise UserError(
            f"layer_types must list {n} entries of {FULL_ATTENTION!r}/{LINEAR_ATTENTION!r}, got {types}",
            hint="fix layer_types or full_attention_interval in config.json",
        )
    return types


def moe_layers(cfg: HFConfig) -> list[bool]:
    """Which layers are sparse MoE (HF Qwen3NextDecoderLayer's rule); the others are dense MLPs."""
    n = int(cfg["num_hidden_layers"])
    num_experts = int(cfg.get("num_experts") or 0)
    step = int(cfg.get("decoder_sparse_step", 1))
    only_mlp = set(cfg.get("mlp_only_layers") or [])
    return [i not in only_mlp and num_experts > 0 and (i + 1) % step == 0 for i in range(n)]


def linear_attention_freq(cfg: HFConfig) -> int | list[int]:
    """Megatron's pattern (1 = GDN, 0 = softmax attention): an int when the HF interval rule holds."""
    pattern = [1 if t == LINEAR_ATTENTION else 0 for t in layer_types(cfg)]
    interval = cfg.get("full_attention_interval")
    if interval and pattern == [0 if (i + 1) % int(interval) == 0 else 1 for i in range(len(pattern))]:
        return int(interval)
    return pattern


def moe_layer_freq(cfg: HFConfig) -> int | list[int]:
    """Megatron's pattern (1 = MoE, 0 = dense): 1 when every layer is MoE, else the explicit list."""
    pattern = [1 if m else 0 for m in moe_layers(cfg)]
    return 1 if all(pattern) else pattern


def _check_divisible(cfg: HFConfig, p: ParallelSizes) -> None:
    checks = [
        ("num_attention_heads", cfg["num_attention_heads"], p.tp, "parallel.tp"),
        ("linear_num_key_heads", cfg["linear_num_key_heads"], p.tp * p.cp, "parallel.tp"),
        ("linear_num_value_heads", cfg["linear_num_value_heads"], p.tp * p.cp, "parallel.tp"),
        ("num_hidden_layers", cfg["num_hidden_layers"], p.pp, "parallel.pp"),
        ("vocab_size", cfg["vocab_size"], p.tp, "parallel.tp"),
    ]
    kv = int(cfg["num_key_value_heads"])
    if kv % p.tp and p.tp % kv:
        raise UserError(
            f"num_key_value_heads={kv} and parallel.tp={p.tp}: one must divide the other",
            hint="pick parallel.tp as a divisor or multiple of the KV head count",
        )
    if any(moe_layers(cfg)):
        checks += [
            ("num_experts", cfg["num_experts"], p.ep, "parallel.ep"),
            ("moe_intermediate_size", cfg["moe_intermediate_size"], p.etp, "parallel.etp"),
        ]
    for name, value, by, option in checks:
        if int(value) % by:
            raise UserError(
                f"{name}={value} is not divisible by {by} ({option})",
                hint=f"change {option} to a divisor of {value}",
            )


def hf_to_transformer_config(
    hf_config: HFConfig | str | Path,
    parallel: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    use_te: bool = False,
    **overrides: Any,
) -> MegatronModelArgs:
    """Map a Qwen3-Next HF config onto a ``TransformerConfig`` and the GPTModel arguments.

    ``use_te`` selects ``transformer_impl`` and the fusions that need Transformer Engine;
    ``overrides`` are set on the TransformerConfig last (e.g. ``recompute_granularity``).
    """
    from megatron.core.transformer import TransformerConfig

    cfg = load_hf_config(hf_config)
    p = ParallelSizes.of(parallel)
    _check_divisible(cfg, p)
    theta, partial = _rope(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act={cfg.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    if cfg.get("use_sliding_window"):
        raise UserError("use_sliding_window=true is not supported", hint="set it to false")

    num_experts = int(cfg.get("num_experts") or 0)
    any_moe = any(moe_layers(cfg))
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)

    kwargs: dict[str, Any] = dict(
        # sizes
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_query_groups=int(cfg["num_key_value_heads"]),
        kv_channels=head_dim,
        # norms: zero-centered RMSNorm everywhere, q/k norm in attention
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        layernorm_zero_centered_gamma=True,
        qk_layernorm=True,
        # gated softmax attention
        attention_output_gate=True,
        add_bias_linear=False,
        add_qkv_bias=bool(cfg.get("attention_bias", False)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        hidden_dropout=0.0,
        attention_softmax_in_fp32=True,
        # SwiGLU
        gated_linear_unit=True,
        activation_func=F.silu,
        # Gated DeltaNet
        experimental_attention_variant="gated_delta_net",
        linear_attention_freq=linear_attention_freq(cfg),
        linear_conv_kernel_dim=int(cfg["linear_conv_kernel_dim"]),
        linear_key_head_dim=int(cfg["linear_key_head_dim"]),
        linear_value_head_dim=int(cfg["linear_value_head_dim"]),
        linear_num_key_heads=int(cfg["linear_num_key_heads"]),
        linear_num_value_heads=int(cfg["linear_num_value_heads"]),
        # init (only used for models built from scratch)
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        # parallelism
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel and p.tp > 1,
        # precision
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        # implementation / fusions: the TE-free stack needs them all off
        transformer_impl="transformer_engine" if use_te else "local",
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # megatron's own fused cross-entropy (torch.compile'd pieces, no TE) under QNEXT_FUSED (fused.py) on GPU
        # machines (on CPU its compiling would cost more than it saves); it serves a vocabulary split over TP
        # ranks: with the whole vocabulary on one GPU fla's loss takes over (lm_loss.py)
        cross_entropy_loss_fusion=not use_te and fused_enabled() and torch.cuda.is_available(),
        cross_entropy_fusion_impl="native",
    )
    if any_moe:
        kwargs.update(
            num_moe_experts=num_experts,
            moe_layer_freq=moe_layer_freq(cfg),
            moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
            moe_router_topk=int(cfg["num_experts_per_tok"]),
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", True)),
            # router logits in the model dtype, softmax in fp32, as transformers' Qwen3NextTopKRouter computes them
            # (F.linear on bf16 weights): "fp32" rounded differently from the reference model and ran its GEMMs
            # as fp32 SIMT kernels (~45 ms of a 1.2 s full-training step of the 4-layer proxy)
            moe_router_dtype=None,
            moe_shared_expert_intermediate_size=shared or None,
            moe_shared_expert_gate=shared > 0,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.0)),
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=use_te,  # TE path: TEGroupedMLP; TE-free path: qnext GroupedGemmExperts
            moe_permute_fusion=False,
        )
    # qnext's own fields (GroupedGemmExperts reads them); TransformerConfig does not take them
    expert_base = overrides.pop("qnext_expert_base", "bf16")
    recompute_experts_act = bool(overrides.pop("qnext_recompute_experts_act", False))
    recompute_experts = bool(overrides.pop("qnext_recompute_experts", False))
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    config.qnext_expert_base = expert_base
    config.qnext_recompute_experts_act = recompute_experts_act
    config.qnext_recompute_experts = recompute_experts
    return MegatronModelArgs(
        config=config,
        vocab_size=int(cfg["vocab_size"]),
        max_sequence_length=int(cfg.get("max_position_embeddings", 4096)),
        rotary_percent=partial,
        rotary_base=theta,
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
    )
