"""qnext's sorted MoE token dispatcher against megatron's own, on CPU in a world of one.

Two MoE layers of the tiny Qwen3-Next (router, 8 routed experts on the grouped-GEMM module, gated
shared expert) hold the same weights; one dispatches with megatron's dispatcher
(``QNEXT_MOE_DISPATCH=megatron``), the other with :class:`SortedTokenDispatcher`. Outputs, input
gradients and every weight gradient must agree to float32 rounding, and the sorted dispatcher must
hand the experts token counts that live on the input's device (no host copy).
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
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    yield


def _layer(mode: str, monkeypatch, hidden: int = 64, experts: int = 8, topk: int = 3, **overrides):
    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device
    from qnext.megatron.spec import _local_moe

    cfg = json.loads(TINY.read_text()) | {"hidden_size": hidden, "num_experts": experts, "num_experts_per_tok": topk,
                                          "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}
    tc = hf_to_transformer_config(cfg, None, torch.float32, **CPU_BUILD_OVERRIDES, **overrides).config
    monkeypatch.setenv("QNEXT_MOE_DISPATCH", mode)
    with construction_device("cpu"):
        layer = _local_moe()(config=tc, layer_number=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return layer


def _run(layer, x):
    from qnext.megatron.parallel import construction_device

    x = x.clone().requires_grad_(True)
    with construction_device("cpu"):  # megatron's router moves its weight to torch.cuda.current_device()
        out, _ = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


def test_sorted_dispatcher_equals_megatrons(world, monkeypatch):
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from qnext.megatron.dispatch import SortedTokenDispatcher

    ref = _layer("megatron", monkeypatch)
    ours = _layer("sorted", monkeypatch)
    assert isinstance(ref.token_dispatcher, MoEAllGatherTokenDispatcher)
    assert isinstance(ours.token_dispatcher, SortedTokenDispatcher)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(40, 2, 64, generator=torch.Generator().manual_seed(1))  # [seq, batch, hidden]
    out_r, dx_r, g_r = _run(ref, x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out_o, dx_o, g_o = _run(ours, x)
    ops = {e.key for e in prof.key_averages()}
    # the reorderings' backwards are gathers: no scatter-add (bf16 atomics on a GPU) anywhere in the step
    assert "aten::index_select" in ops and "aten::index_add_" not in ops and "aten::index_add" not in ops
    torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_o, dx_r, rtol=1e-5, atol=1e-6)
    assert g_o.keys() == g_r.keys() and any("router" in n for n in g_o)
    for name in g_r:
        torch.testing.assert_close(g_o[name], g_r[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_sorted_dispatch_counts_stay_on_the_device_and_cover_every_choice(world, monkeypatch):
    layer = _layer("sorted", monkeypatch)
    d = layer.token_dispatcher
    from qnext.megatron.parallel import construction_device

    x = torch.randn(30, 64)
    with construction_device("cpu"):
        probs, routing_map = layer.router(x.view(30, 1, 64))
    permuted, permuted_probs = d.dispatch_preprocess(x, routing_map, probs)
    tokens, counts, p = d.dispatch_postprocess(*d.token_dispatch(permuted, permuted_probs))
    assert isinstance(counts, torch.Tensor) and counts.device == x.device
    assert counts.tolist() == routing_map.sum(0).tolist() and int(counts.sum()) == 30 * 3
    # tokens arrive grouped by expert, each with its own routing probability
    expert_of_row = torch.repeat_interleave(torch.arange(8), counts)
    token_of_row = (permuted[:, None, :] == x[None]).all(-1).float().argmax(-1)
    assert routing_map[token_of_row, expert_of_row].all()
    torch.testing.assert_close(p, probs[token_of_row, expert_of_row])
    # combining k unit outputs per token gives k: every (token, choice) pair comes back exactly once
    back = d.combine_postprocess(torch.ones_like(tokens))
    assert torch.equal(back, torch.full_like(x, 3.0))


def test_dispatch_mode_is_checked(monkeypatch):
    from qnext.errors import UserError
    from qnext.megatron.dispatch import dispatch_mode

    monkeypatch.setenv("QNEXT_MOE_DISPATCH", "fast")
    with pytest.raises(UserError, match="QNEXT_MOE_DISPATCH"):
        dispatch_mode()


def _step_keeping_track_of_the_experts_input(layer, x, monkeypatch):
    """(whether the experts' input rows are still alive between forward and backward, output, input gradient,
    weight gradients)."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    from qnext.megatron.parallel import construction_device

    seen = []
    forward = layer.experts.forward

    def spy(rows, *args, **kwargs):
        seen.append(StorageWeakRef(rows.untyped_storage()))
        return forward(rows, *args, **kwargs)

    monkeypatch.setattr(layer.experts, "forward", spy)
    x = x.clone().requires_grad_(True)
    with construction_device("cpu"):
        out, _ = layer(x)
    gc.collect()
    alive = not seen[0].expired()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return alive, out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_experts_input_is_gathered_again_for_the_backward_not_kept(world, monkeypatch):
    """The sorted dispatcher's gathered rows (k per token) are not kept from the forward to fc1's weight
    gradient: they are gathered again from the MoE input. Same bits as keeping them (QNEXT_MOE_REGATHER=0)."""
    x = torch.randn(40, 2, 64, generator=torch.Generator().manual_seed(1))
    runs = {}
    for keep in ("0", "1"):
        monkeypatch.setenv("QNEXT_MOE_REGATHER", keep)
        runs[keep] = _step_keeping_track_of_the_experts_input(_layer("sorted", monkeypatch), x, monkeypatch)
    assert runs["0"][0], "with QNEXT_MOE_REGATHER=0 autograd keeps the experts' input (the check can see it)"
    assert not runs["1"][0], "the experts' input rows were kept for the backward"
    kept, again = runs["0"], runs["1"]
    assert torch.equal(again[1], kept[1]) and torch.equal(again[2], kept[2])
    assert again[3].keys() == kept[3].keys() and any("experts" in n for n in kept[3])
    for name in kept[3]:
        assert torch.equal(again[3][name], kept[3][name]), name


def test_recomputed_experts_gather_their_input_again_and_give_the_same_bits(world, monkeypatch):
    """parallel.recompute=experts in the MoE block: the experts' gathered rows are not kept (their recompute starts
    from the MoE input) and the output and every gradient are the bits of the layer without recompute."""
    x = torch.randn(40, 2, 64, generator=torch.Generator().manual_seed(1))
    plain = _step_keeping_track_of_the_experts_input(_layer("sorted", monkeypatch), x, monkeypatch)
    layer = _layer("sorted", monkeypatch, qnext_recompute_experts=True)
    assert layer.experts.recompute_experts
    again = _step_keeping_track_of_the_experts_input(layer, x, monkeypatch)
    assert not again[0], "the experts' input rows were kept for the backward"
    assert torch.equal(again[1], plain[1]) and torch.equal(again[2], plain[2])
    for name in plain[3]:
        assert torch.equal(again[3][name], plain[3][name]), name


def test_regather_refuses_an_input_changed_in_place(world, monkeypatch):
    from qnext.megatron.parallel import construction_device

    layer = _layer("sorted", monkeypatch)
    x = torch.randn(40, 2, 64, requires_grad=True)
    h = x * 1.0  # a non-leaf the MoE block reads (as the pre-MLP norm's output)
    with construction_device("cpu"):
        out, _ = layer(h)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="cannot be gathered again"):
        out.sum().backward()
    monkeypatch.setenv("QNEXT_MOE_REGATHER", "2")
    from qnext.errors import UserError
    from qnext.megatron.regather import regather_enabled

    with pytest.raises(UserError, match="QNEXT_MOE_REGATHER"):
        regather_enabled()
