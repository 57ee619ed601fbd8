"""models/*.sh flags parse with megatron.training's own argument parser and give the
TransformerConfig fields the Megatron backend builds from the same HF config (slow: imports megatron)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("megatron.training")
pytestmark = pytest.mark.slow

# megatron.training argument -> TransformerConfig field
SAME = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels", "attention_output_gate": "attention_output_gate", "qk_layernorm": "qk_layernorm",
    "layernorm_zero_centered_gamma": "layernorm_zero_centered_gamma",
    "experimental_attention_variant": "experimental_attention_variant", "linear_attention_freq": "linear_attention_freq",
    "linear_conv_kernel_dim": "linear_conv_kernel_dim", "linear_key_head_dim": "linear_key_head_dim",
    "linear_value_head_dim": "linear_value_head_dim", "linear_num_key_heads": "linear_num_key_heads",
    "linear_num_value_heads": "linear_num_value_heads", "num_experts": "num_moe_experts",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size", "moe_router_topk": "moe_router_topk",
    "moe_router_score_function": "moe_router_score_function", "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate": "moe_shared_expert_gate", "moe_layer_freq": "moe_layer_freq",
    "swiglu": "gated_linear_unit", "rotary_percent": None, "rotary_base": None,
}


@pytest.mark.parametrize("name", ["qwen3_next_80b_a3b", "tiny_qwen3_next"])
def test_flags_parse_and_match_the_backend_config(name):
    from megatron.training.arguments import add_megatron_arguments

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.models.megatron_args import flat_args

    cfg = json.loads((REPO / f"models/{name}/config.json").read_text())
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(flat_args(cfg, mtp=True))
    backend = hf_to_transformer_config(cfg, None, torch.bfloat16)
    c = backend.config
    for arg, field in SAME.items():
        want = getattr(c, field) if field else {"rotary_percent": backend.rotary_percent,
                                                 "rotary_base": backend.rotary_base}[arg]
        assert getattr(args, arg) == want, f"{name}: --{arg.replace('_', '-')} = {getattr(args, arg)!r}, backend {want!r}"
    assert args.untie_embeddings_and_output_weights and args.add_bias_linear is False and c.add_bias_linear is False
    assert args.mtp_num_layers == 1 and args.vocab_size == cfg["vocab_size"]
