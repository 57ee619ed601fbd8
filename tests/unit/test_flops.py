"""The FLOP accounting of ``qnext.throughput`` against ``torch.utils.flop_counter`` on transformers'
Qwen3-Next (tiny config, CPU, eager experts and eager attention so every product is a counted matmul;
the torch GDN path).

Per component (forward, T tokens): the projections, router, routed experts, shared expert and LM head
exactly; the attention scores as the causal half of the T x T products the eager kernel computes;
the GDN chunk products exactly, plus the UT transform that the torch reference does as triangular
solves (not matmuls); the conv up to its causal padding. Forward + backward: 3x the forward matmul
FLOPs for full training, 2x (slightly less) for LoRA.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
T = 128  # two GDN chunks


def _model(cfg: dict, lora: bool = False):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from qnext.models.hf import force_torch_gdn_path

    force_torch_gdn_path()
    c = Qwen3NextConfig(**cfg)
    c._experts_implementation = "eager"  # the per-expert loop: F.linear on the routed tokens
    c._attn_implementation = "eager"  # Q K^T and P V as matmuls
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(c)
    if lora:
        from peft import LoraConfig, get_peft_model

        from qnext.config.schema import DEFAULT_LORA_TARGETS

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_LORA_TARGETS)))
    return model


@pytest.fixture(scope="module")
def cfg() -> dict:
    c = json.loads((REPO / "models/tiny_qwen3_next/config.json").read_text())
    c.update(vocab_size=512, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return c


def _count(model, ids, backward: bool = False) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        if backward:
            model(ids).logits.float().square().mean().backward()
        else:
            with torch.no_grad():
                model(ids)
    return {k: {str(op): n for op, n in v.items()} for k, v in fc.get_flop_counts().items()}


def _mm(counts: dict, pattern: str) -> int:
    """Matmul FLOPs (mm/addmm) recorded directly under modules whose name matches ``pattern``."""
    return sum(n for k, v in counts.items() if re.fullmatch(pattern, k)
               for op, n in v.items() if op in ("aten.mm", "aten.addmm"))


def test_forward_terms_match_the_profiler(cfg):
    from qnext.throughput import GDN_CHUNK, attention_flops, forward_flops_breakdown, forward_flops_per_token

    counts = _count(_model(cfg).eval(), torch.randint(0, 512, (1, T)))
    ours = {k: v * T for k, v in forward_flops_breakdown(cfg).items()}
    exact = {
        "attention_proj": r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        "gdn_proj": r".*linear_attn\.(in_proj_qkvz|in_proj_ba|out_proj)",
        "router": r".*mlp\.gate",
        "experts": r".*mlp\.experts",
        "shared_expert": r".*mlp\.shared_expert(_gate)?",
        "lm_head": r".*lm_head",
    }
    for term, pattern in exact.items():
        assert ours[term] > 0 and _mm(counts, pattern) == ours[term], (term, _mm(counts, pattern), ours[term])
    assert ours["dense_mlp"] == 0  # every tiny layer is MoE

    gdn = [v for k, v in counts.items() if k.endswith("linear_attn")]
    attn = [v for k, v in counts.items() if k.endswith("self_attn")]
    assert len(gdn) == 2 and len(attn) == 2
    # attention scores: eager computes the full T x T products; the causal half is the work
    full_scores = sum(v["aten.bmm"] for v in attn)
    assert attention_flops(cfg, [T]) == full_scores * (T + 1) / (2 * T)
    # GDN chunks: every product but the UT transform (triangular solves in the torch reference)
    nv, dk, dv = cfg["linear_num_value_heads"], cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    ut_transform = 2 * T * nv * GDN_CHUNK * (dk + dv) * len(gdn)
    assert ours["gdn_recurrence"] == sum(v["aten.bmm"] for v in gdn) + ut_transform
    # depthwise conv: the profiler counts the causal padding's K - 1 extra outputs
    conv = sum(v["aten.convolution"] for v in gdn)
    assert conv == ours["gdn_conv"] * (T + cfg["linear_conv_kernel_dim"] - 1) / T
    assert sum(ours.values()) == forward_flops_per_token(cfg) * T


def test_training_passes_full_three_lora_two(cfg):
    """Matmul FLOPs of forward + backward over forward: full training does weight and input
    gradients (3x); LoRA only input gradients of frozen weights (2x, less the first layer's)."""
    from qnext.throughput import step_flops

    ids = torch.randint(0, 512, (1, T))
    ratios = {}
    for lora in (False, True):
        model = _model(cfg, lora=lora)
        # the whole model's mm/addmm: every linear (the GDN chunks and attention scores are bmm); the
        # profiler's per-module split of backward ops is not reliable, the total is
        fwd = _mm(_count(model.eval(), ids), "Global")
        both = _mm(_count(model.train(), ids, backward=True), "Global")
        ratios["lora" if lora else "full"] = both / fwd
    print("forward+backward / forward matmul FLOPs:", ratios)
    assert abs(ratios["full"] - 3.0) < 1e-6, ratios
    assert 1.75 < ratios["lora"] <= 2.0, ratios
    assert step_flops(cfg, [T], lora=False) / step_flops(cfg, [T], lora=True) == 1.5


def test_ep_all_to_all_estimate_of_the_80b_recipe():
    """The arithmetic the one-GPU emulation of the 80B recipe's EP8 rank uses for its missing all-to-all:
    48 MoE layers, top-10 of hidden 2048 in bf16, 4096 tokens per GPU, 7/8 of the copies leave the GPU."""
    import json
    from pathlib import Path

    from qnext.throughput import ep_all_to_all_bytes, ep_all_to_all_seconds

    hf = json.loads((Path(__file__).resolve().parents[2] / "models/qwen3_next_80b_a3b/config.json").read_text())
    per_layer_pass = 2 * 4096 * 10 * 2048 * 2 * 7 / 8  # dispatch + combine, one pass
    assert ep_all_to_all_bytes(hf, 4096, 8) == 2 * 48 * per_layer_pass
    assert ep_all_to_all_bytes(hf, 4096, 8, moe_passes=3) == 3 * 48 * per_layer_pass
    assert ep_all_to_all_bytes(hf, 4096, 1) == 0.0  # all experts local: nothing moves
    assert abs(ep_all_to_all_seconds(hf, 4096, 8) - 2 * 48 * per_layer_pass / 450e9) < 1e-12
    assert 0.05 < ep_all_to_all_seconds(hf, 4096, 8) < 0.07  # about 63 ms of NVLink per 4096-token step
