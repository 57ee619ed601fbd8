"""parallel.recompute=experts_act: qnext's grouped experts keep fc1's output and the routing
probabilities, not the activation's output, and recompute it in the backward. Same outputs and gradients
(every one) as without; fewer bytes saved for the backward, by exactly the activation output's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
TINY = Path(__file__).resolve().parents[2] / "models/tiny_qwen3_next/config.json"


@pytest.fixture(scope="module")
def world():
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    yield


def _run(recompute, weights=None):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.experts import GroupedGemmExperts
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES

    cfg = json.loads(TINY.read_text()) | {"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 6}
    level = {False: "none", True: "experts_act"}.get(recompute, recompute)
    tc = hf_to_transformer_config(cfg, None, torch.float32, qnext_recompute_experts_act=level == "experts_act",
                                  qnext_recompute_experts=level == "experts", **CPU_BUILD_OVERRIDES).config
    m = GroupedGemmExperts(6, tc, pg_collection=get_default_pg_collection())
    assert (m.recompute_activation, m.recompute_experts) == (level == "experts_act", level == "experts")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("linear_fc1", "linear_fc2"):
            getattr(m, name).weight.copy_(torch.randn(getattr(m, name).weight.shape, generator=g) * 0.1)
    counts = torch.tensor([4, 0, 7, 3, 1, 5])
    x = torch.randn(int(counts.sum()), 64, generator=g, requires_grad=True)
    probs = torch.rand(x.shape[0], generator=g, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = m(x, counts, probs)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [x.grad, probs.grad, m.linear_fc1.weight.grad, m.linear_fc2.weight.grad]
    return out.detach(), grads, sum(saved), int(counts.sum()) * 32 * 4  # tokens x ffn x fp32


def test_recomputed_activation_gives_the_same_gradients_and_saves_its_output(world):
    out, grads, saved, act_bytes = _run(False)
    out_r, grads_r, saved_r, _ = _run(True)
    assert torch.equal(out, out_r)
    for a, b in zip(grads, grads_r):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    print(f"bytes saved for backward: {saved} without recompute, {saved_r} with; activation output {act_bytes}")
    assert saved - saved_r >= act_bytes


def test_recomputed_experts_give_the_same_gradients_and_keep_only_their_input(world):
    """parallel.recompute=experts: the routed experts run again in the backward; nothing of theirs is kept but
    their input and the probabilities (held by the checkpoint itself, not through autograd's saved tensors)."""
    out, grads, saved, act_bytes = _run("none")
    out_r, grads_r, saved_r, _ = _run("experts")
    _, _, saved_act, _ = _run("experts_act")
    assert torch.equal(out, out_r)
    for a, b in zip(grads, grads_r):
        assert torch.equal(a, b)
    print(f"bytes saved for backward: none {saved}, experts_act {saved_act}, experts {saved_r}")
    inputs = act_bytes // 32 * (64 + 1)  # the rows (64 float32 values each) and their probabilities
    assert saved_r <= inputs < saved_act < saved


def test_planner_orders_the_levels(world):
    from qnext.config import load_config
    from qnext.plan import plan

    acts = {lvl: plan(load_config(["recipe=qwen3_next_80b_full", f"parallel.recompute={lvl}"]), world_size=32).activations
            for lvl in ("none", "experts_act", "experts", "selective", "full")}
    assert acts["none"] > acts["experts_act"] > acts["experts"] > acts["selective"] > acts["full"]
