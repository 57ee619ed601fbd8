"""The Megatron model's MoE router computes what transformers' Qwen3-Next router computes, in bf16.

transformers' ``Qwen3NextTopKRouter`` takes the logits with ``F.linear`` on the bf16 weights (bf16 logits), a
float32 softmax over all experts, the top k, a float32 renormalisation, and casts the k probabilities to bf16.
The Megatron config (``qnext.megatron.config``) must give the same experts and the same probabilities to
bf16 rounding: an fp32 router (``moe_router_dtype="fp32"``) rounds the logits differently and moves the
probabilities by more than that wherever the logits are large.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models/tiny_qwen3_next/config.json"


@pytest.fixture(scope="module")
def world():
    from dist_fixtures import gloo_world_of_one

    gloo_world_of_one()
    yield


def _hf_router(cfg: dict, weight: torch.Tensor):
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextTopKRouter

    router = Qwen3NextTopKRouter(Qwen3NextConfig(**cfg)).to(torch.bfloat16)
    with torch.no_grad():
        router.weight.copy_(weight)
    return router


def test_megatron_router_matches_transformers_in_bf16(world):
    from qnext.megatron.model import build_model
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device

    cfg = json.loads(TINY.read_text())
    with construction_device("cpu"):
        model = build_model(TINY, None, torch.bfloat16, use_te=False, config_overrides=dict(CPU_BUILD_OVERRIDES))
    router = model.decoder.layers[0].mlp.router
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(router.weight.shape, generator=g) * 0.5).to(torch.bfloat16)
    with torch.no_grad():
        router.weight.copy_(weight)
    # logits of a few units to ~20, as a trained router produces: bf16 rounding of them is visible in the softmax
    x = (torch.randn(64, cfg["hidden_size"], generator=g) * 2.0).to(torch.bfloat16)
    router.eval()
    with torch.no_grad(), construction_device("cpu"):  # megatron's gating moves a CPU weight to the current device
        probs, routing_map = router(x.unsqueeze(1))  # [tokens, 1 (batch), hidden], as the MoE layer passes it
        _, hf_scores, hf_idx = _hf_router(cfg, weight)(x)
    k = cfg["num_experts_per_tok"]
    assert routing_map.shape == (64, cfg["num_experts"]) and int(routing_map.sum()) == 64 * k
    ours_idx = routing_map.nonzero()[:, 1].view(64, k)
    assert torch.equal(ours_idx, hf_idx.sort(dim=-1).values), "the router picked other experts than transformers'"
    ours = probs.gather(1, hf_idx)
    assert ours.dtype == torch.bfloat16, f"router probabilities in {ours.dtype}, transformers' are bf16"
    # same function, float32 arithmetic in another order (softmax over k vs renormalised softmax over all): at most
    # one bf16 rounding step apart
    torch.testing.assert_close(ours.float(), hf_scores.float(), rtol=2 ** -8, atol=1e-6)
