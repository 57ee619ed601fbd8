"""Shared pieces of the quantized-expert tests (test_quant_fp8.py, test_quant_nf4.py): the grouped linear
they compare against, and two frozen experts modules of the tiny config holding the same random weights,
run forward and backward on the same routed tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY = Path(__file__).resolve().parents[2] / "models/tiny_qwen3_next/config.json"


def grouped(x, w, counts, offsets=None):
    from qnext.megatron.experts import grouped_linear

    return grouped_linear(x, w, counts, offsets)


def twin_experts(seed: int = 2):
    """Two frozen ``GroupedGemmExperts`` (6 experts, hidden 64) with the same weights; returns them, the
    weights by name, and the generator for what follows."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.experts import GroupedGemmExperts
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES

    cfg = json.loads(TINY.read_text()) | {"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 6}
    tc = hf_to_transformer_config(cfg, None, torch.float32, **CPU_BUILD_OVERRIDES).config
    mods = [GroupedGemmExperts(6, tc, pg_collection=get_default_pg_collection()) for _ in range(2)]
    g = torch.Generator().manual_seed(seed)
    weights = {}
    with torch.no_grad():
        for name in ("linear_fc1", "linear_fc2"):
            w = torch.randn(getattr(mods[0], name).weight.shape, generator=g) * 0.1
            weights[name] = w
            for m in mods:
                getattr(m, name).weight.copy_(w)
    for m in mods:
        m.requires_grad_(False)  # frozen base, as in LoRA
    return mods, weights, g


def run_experts(mods, g):
    """Each module on the same routed tokens, backward from ones: (outputs, input gradients)."""
    counts = torch.tensor([4, 0, 7, 3, 1, 5])
    x = torch.randn(int(counts.sum()), 64, generator=g)
    probs = torch.rand(x.shape[0], generator=g)
    outs, grads = [], []
    for m in mods:
        xi = x.clone().requires_grad_(True)
        out, _ = m(xi, counts, probs)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append(xi.grad)
    return outs, grads


def assert_same_as_dequantized(apply, w: torch.Tensor, g: torch.Generator) -> None:
    """``apply(x, counts)`` (a quantized grouped linear) against ``grouped`` with the dequantized weight
    ``w`` [4 experts, out, in]: the same bits forward and for the input gradient."""
    counts = [3, 0, 5, 2]
    x = torch.randn(10, w.shape[-1], generator=g).to(torch.bfloat16)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y_q = apply(xs[0], counts)
    y_ref = grouped(xs[1], w, counts)
    assert torch.equal(y_q, y_ref)
    grad = torch.randn(y_ref.shape, generator=g).to(torch.bfloat16)
    y_q.backward(grad)
    y_ref.backward(grad)
    assert xs[0].grad is not None and torch.equal(xs[0].grad, xs[1].grad)


@pytest.fixture(scope="module")
def world():
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    yield
