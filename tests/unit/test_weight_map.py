"""The Qwen3-Next weight map: coverage, shapes, exact inverses, and the fused attention layout
checked against HF's q/gate split and megatron-core's split (restated from its source). The GDN
in_proj check against transformers' own module is in tests/integration (it imports fla)."""
from __future__ import annotations

import json

import pytest
import torch

from qnext.errors import UserError
from qnext.models.qwen3_next import (
    GatedQkv,
    GdnInProj,
    Qwen3NextDims,
    build_weight_map,
    hf_to_megatron_modules,
    mtp_layers_in,
)
from qnext.models.weight_map import megatron_tensors

from convert_fixtures import REPO, small_config


def _cfg(name: str) -> dict:
    return json.loads((REPO / f"models/{name}/config.json").read_text())


def test_every_rule_is_exactly_invertible():
    wm = build_weight_map(small_config(), mtp_layers=1)
    g = torch.Generator().manual_seed(0)
    for m in wm.mappings:
        xs = [torch.randn(s, generator=g) for s in m.hf_shapes]
        ys = m.to_megatron(xs)
        assert [tuple(y.shape) for y in ys] == [p.shape for p in m.pieces], m.hf
        back = m.to_hf(ys)
        if m.transform.lossy:
            continue
        for name, x, b in zip(m.hf, xs, back):
            assert torch.equal(x, b), f"{name}: to_hf(to_megatron(x)) != x"


def test_pieces_tile_every_megatron_tensor_and_names_are_unique():
    wm = build_weight_map(small_config(), mtp_layers=1)
    shapes = megatron_tensors(wm.mappings)  # raises when pieces overlap or leave holes
    assert len(wm.by_hf) == sum(len(m.hf) for m in wm.mappings)
    assert shapes["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"] == (8, 128, 128)
    assert shapes["decoder.layers.0.self_attention.in_proj.weight.value"] == (128, 128)
    assert shapes["decoder.layers.1.self_attention.linear_qkv.weight"] == (4 * 32 * 2 + 2 * 2 * 32, 128)
    assert "mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight" in shapes


def test_real_model_dims():
    wm = build_weight_map(_cfg("qwen3_next_80b_a3b"), mtp_layers=1)
    d = wm.dims
    assert (d.hidden, d.num_experts, d.nk, d.nv, d.num_heads, d.num_groups) == (2048, 512, 16, 32, 16, 2)
    assert d.layer_types.count("full_attention") == 12 and all(d.moe_layers)
    s = wm.megatron_shapes
    assert s["decoder.layers.0.self_attention.in_proj.weight.query"] == (2048, 2048)
    assert s["decoder.layers.3.self_attention.linear_qkv.weight"] == (16 * 256 * 2 + 2 * 2 * 256, 2048)
    assert s["decoder.layers.47.mlp.experts.experts.linear_fc2.weight"] == (512, 2048, 512)
    assert wm.hf_shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (2 * 2048 + 2 * 4096, 2048)
    assert len(wm.hf_shapes) == 3 + 48 * (2 + 1 + 512 * 3 + 4) + 36 * 7 + 12 * 6 + 4 + 2 + 1 + 512 * 3 + 4 + 6


def test_wrong_model_type_is_a_user_error():
    with pytest.raises(UserError, match="model_type"):
        Qwen3NextDims.from_hf_config({**small_config(), "model_type": "qwen3_moe"})


def test_mtp_detection():
    assert mtp_layers_in(["model.norm.weight"]) == 0
    assert mtp_layers_in(["mtp.fc.weight", "mtp.layers.0.mlp.gate.weight"]) == 1


def test_gated_qkv_layout_matches_hf_and_megatron():
    d = Qwen3NextDims.from_hf_config(small_config())
    qw = torch.randn(2 * d.num_heads * d.head_dim, d.hidden)
    kw, vw = torch.randn(2, d.num_groups * d.head_dim, d.hidden)
    x = torch.randn(3, d.hidden)
    # HF Qwen3NextAttention: q_proj(h).view(..., -1, head_dim * 2) chunked into query, gate
    hq, hgate = torch.chunk((x @ qw.T).view(3, -1, d.head_dim * 2), 2, dim=-1)
    hk, hv = (x @ kw.T).view(3, -1, d.head_dim), (x @ vw.T).view(3, -1, d.head_dim)
    (w,) = GatedQkv().to_megatron([qw, kw, vw], d)
    # megatron SelfAttention.get_query_key_value_tensors with output_gate (TP=1)
    hpg = d.heads_per_group
    mixed = (x @ w.T).view(3, d.num_groups, (2 * hpg + 2) * d.head_dim)
    mq, mgate, mk, mv = torch.split(mixed, [hpg * d.head_dim, hpg * d.head_dim, d.head_dim, d.head_dim], dim=-1)
    torch.testing.assert_close(mq.reshape(3, -1, d.head_dim), hq, rtol=0, atol=1e-5)
    torch.testing.assert_close(mgate.reshape(3, -1, d.head_dim), hgate, rtol=0, atol=1e-5)
    torch.testing.assert_close(mk, hk, rtol=0, atol=1e-5)
    torch.testing.assert_close(mv, hv, rtol=0, atol=1e-5)


def test_lora_row_permutation_moves_b_like_the_weight():
    d = Qwen3NextDims.from_hf_config(small_config())
    qkvz, ba = torch.randn(2 * d.qk_dim + 2 * d.v_dim, 7), torch.randn(2 * d.nv, 7)
    perm = GdnInProj().row_permutation([qkvz.shape[0], ba.shape[0]], d)
    assert torch.equal(torch.cat([qkvz, ba])[perm], torch.cat(GdnInProj().to_megatron([qkvz, ba], d)))


def test_lora_targets_in_hf_terms_map_to_megatron_linears():
    m = hf_to_megatron_modules()
    assert m["self_attn.q_proj"] == m["self_attn.v_proj"] == "self_attention.linear_qkv"
    assert m["linear_attn.in_proj_qkvz"] == m["linear_attn.in_proj_ba"] == "self_attention.in_proj"
    assert m["linear_attn.out_proj"] == "self_attention.out_proj" and m["self_attn.o_proj"] == "self_attention.linear_proj"
    assert m["mlp.experts.{e}.up_proj"] == "mlp.experts.experts.linear_fc1"
    assert m["mlp.shared_expert.down_proj"] == "mlp.shared_experts.linear_fc2"
    assert "linear_attn.conv1d" not in m and "mlp.gate" not in m
