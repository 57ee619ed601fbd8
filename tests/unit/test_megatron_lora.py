"""LoRA for the Megatron backend, single process: targets, row placement read off the weight map,
TP sharding math with simulated ranks (float32 against the unsharded computation), the fused-norm
input, and the LoRA linear on real megatron ColumnParallelLinear / RowParallelLinear modules at TP1.

The simulated ranks use the code's own plan and math (``plan_module``, ``ModulePlan.shard``,
``column_delta`` / ``row_partial`` / ``row_delta``); the reference is the unsharded HF-space LoRA
pushed through the weight map's transform and split the way megatron shards each fused weight
(every checkpoint piece chunked over TP, chunks side by side: ``linear_qkv`` rows,
the GDN ``in_proj`` sections, the SwiGLU fc1 halves).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qnext.config.schema import DEFAULT_LORA_TARGETS, LoraConfig
from qnext.errors import UserError
from qnext.lora.layers import column_delta, column_weight_delta, fused_input_norm, row_delta, row_partial
from qnext.lora.plan import COLUMN, ROW, layer_targets, peft_targets, plan_module
from qnext.models.qwen3_next import build_weight_map

REPO = Path(__file__).resolve().parents[2]
TINY = json.loads((REPO / "models/tiny_qwen3_next/config.json").read_text())
TOL = dict(rtol=1e-6, atol=1e-6)  # for values of order one
R = 4
SCALE = 2.5

# (layer, Megatron module, HF targets): layer 0 is Gated DeltaNet, layer 1 gated attention
COLUMN_CASES = [
    (1, "self_attention.linear_qkv", ["q_proj", "k_proj", "v_proj"]),
    (1, "self_attention.linear_qkv", ["q_proj", "v_proj"]),  # k_proj rows get no LoRA
    (0, "self_attention.in_proj", ["in_proj_qkvz", "in_proj_ba"]),
    (0, "self_attention.in_proj", ["in_proj_ba"]),
    (0, "mlp.shared_experts.linear_fc1", ["shared_expert.gate_proj", "shared_expert.up_proj"]),
    (1, "mlp.shared_experts.linear_fc1", ["shared_expert.up_proj"]),
]
ROW_CASES = [
    (1, "self_attention.linear_proj", ["o_proj"]),
    (0, "self_attention.out_proj", ["out_proj"]),
    (0, "mlp.shared_experts.linear_fc2", ["shared_expert.down_proj"]),
]


@pytest.fixture(scope="module")
def wm():
    return build_weight_map(TINY)


def _module_weights(wm, layer, module):
    """All HF weights fused into ``module`` (targeted or not) with their mappings, in table order."""
    from qnext.lora.plan import _module_mappings

    return _module_mappings(wm, layer, module)


def megatron_shard(pieces: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
    """This rank's rows of a column-parallel fused weight: every checkpoint piece chunked over TP,
    side by side (megatron: linear_qkv plain rows, GDN ``in_proj_split_sections`` per rank,
    ``apply_swiglu_sharded_factory`` for [gate; up])."""
    return torch.cat([torch.chunk(p, tp, dim=0)[rank] for p in pieces], dim=0)


def assert_rel(got: torch.Tensor, want: torch.Tensor, what: str = "", tol: float = 1e-6) -> None:
    """float32 result vs a float64 reference: relative L2 error below ``tol`` (prints both numbers)."""
    err = float((got.detach().double() - want.double()).norm() / want.double().norm())
    assert got.dtype == torch.float32 and err < tol, f"{what}: relative L2 error {err:.3e} (limit {tol:.0e})"


def _random_lora(wm, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        rows, cols = wm.hf_shapes[n]
        out[n] = (torch.randn(R, cols, generator=g), torch.randn(rows, R, generator=g))
    return out


def _fused_delta(wm, layer, module, lora):
    """The unsharded LoRA delta of the fused Megatron weight, through the weight map: HF weights
    without a branch contribute zero rows."""
    pieces = []
    for m in _module_weights(wm, layer, module):
        hf = []
        for n in m.hf:
            rows, cols = wm.hf_shapes[n]
            hf.append(SCALE * lora[n][1].double() @ lora[n][0].double() if n in lora
                      else torch.zeros(rows, cols, dtype=torch.float64))
        pieces += m.to_megatron(hf)
    return pieces


# ------------------------------------------------------------------------------ targets
def test_peft_targets_defaults_shared_expert_and_errors():
    assert peft_targets(LoraConfig()) == DEFAULT_LORA_TARGETS
    with_shared = peft_targets(LoraConfig(shared_expert=True))
    assert with_shared[-3:] == ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
    with pytest.raises(UserError, match="names no linear layer"):
        peft_targets(LoraConfig(targets=["q_proj", "qkv_proj"]))
    with pytest.raises(UserError, match="routed experts"):
        peft_targets(LoraConfig(experts=True))


def test_layer_targets_group_hf_linears_by_megatron_module(wm):
    t = peft_targets(LoraConfig(shared_expert=True))
    gdn, attn = layer_targets(wm, 0, t), layer_targets(wm, 1, t)
    assert gdn["self_attention.in_proj"] == ["model.layers.0.linear_attn.in_proj_qkvz.weight",
                                             "model.layers.0.linear_attn.in_proj_ba.weight"]
    assert gdn["self_attention.out_proj"] == ["model.layers.0.linear_attn.out_proj.weight"]
    assert set(attn) == {"self_attention.linear_qkv", "self_attention.linear_proj", "mlp.shared_experts.linear_fc1",
                         "mlp.shared_experts.linear_fc2"}
    assert layer_targets(wm, 1, ["k_proj"]) == {"self_attention.linear_qkv": ["model.layers.1.self_attn.k_proj.weight"]}
    assert layer_targets(wm, 0, ["k_proj"]) == {}  # a GDN layer has no k_proj


# ------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layer,module,targets", COLUMN_CASES)
def test_branch_rows_locate_the_hf_rows_in_the_converted_shard(wm, layer, module, targets, tp):
    """Convert random HF weights with the weight map, shard them as megatron does: each branch's
    ``rows`` of the shard hold exactly the HF rows of its B chunk."""
    g = torch.Generator().manual_seed(1)
    mappings = _module_weights(wm, layer, module)
    hf = {n: torch.randn(wm.hf_shapes[n], generator=g) for m in mappings for n in m.hf}
    pieces = [p for m in mappings for p in m.to_megatron([hf[n] for n in m.hf])]
    names = layer_targets(wm, layer, targets)[module]
    for rank in range(tp):
        shard = megatron_shard(pieces, tp, rank)
        plan = plan_module(wm, layer, module, names, COLUMN, tp, rank)
        assert plan.out_local == shard.shape[0]
        for br, n in zip(plan.branches, names):
            assert torch.equal(shard[br.rows], hf[n][br.hf_rows]), (module, n, rank)
            assert br.hf_rows.stop - br.hf_rows.start == wm.hf_shapes[n][0] // tp


# ------------------------------------------------------------------------------ sharding math
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layer,module,targets", COLUMN_CASES)
def test_column_parallel_shards_equal_the_unsharded_lora(wm, layer, module, targets, tp):
    names = layer_targets(wm, layer, targets)[module]
    lora = _random_lora(wm, names)
    x = torch.randn(5, 3, TINY["hidden_size"], generator=torch.Generator().manual_seed(2))
    full = _fused_delta(wm, layer, module, lora)
    for rank in range(tp):
        plan = plan_module(wm, layer, module, names, COLUMN, tp, rank)
        a, b = zip(*(plan.shard(br, *lora[n]) for br, n in zip(plan.branches, names)))
        got = column_delta(x, a, b, [br.rows for br in plan.branches], plan.out_local, SCALE)
        want = x.double() @ megatron_shard(full, tp, rank).T
        assert_rel(got, want, f"{module} {names} rank {rank}/{tp}")
        # merge: the same delta folded into this rank's weight shard
        delta = column_weight_delta(a, b, [br.rows for br in plan.branches], plan.out_local, SCALE)
        assert_rel(delta, megatron_shard(full, tp, rank), f"merge {module} rank {rank}/{tp}")


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("layer,module,targets", ROW_CASES)
def test_row_parallel_partials_sum_to_the_unsharded_lora(wm, layer, module, targets, tp):
    (name,) = layer_targets(wm, layer, targets)[module]
    lora = _random_lora(wm, [name])
    a_full, b_full = lora[name]
    x = torch.randn(8, 2, a_full.shape[1], generator=torch.Generator().manual_seed(3))
    want = SCALE * x.double() @ (b_full.double() @ a_full.double()).T
    plans = [plan_module(wm, layer, module, [name], ROW, tp, rank) for rank in range(tp)]
    partials, bs = [], []
    for rank, plan in enumerate(plans):
        a, b = plan.shard(plan.branches[0], a_full, b_full)
        assert torch.equal(b, b_full)  # B replicated
        x_local = torch.chunk(x, tp, dim=-1)[rank]  # the row-parallel input arrives sharded on features
        partials.append(row_partial(x_local, a))
        bs.append(b)
    u = torch.stack(partials).sum(0)  # all-reduce
    for rank, b in enumerate(bs):
        assert_rel(row_delta(u, b, SCALE), want, f"{module} rank {rank}/{tp}")
    # sequence parallel: reduce-scatter over tokens, then each rank applies B to its tokens
    for rank, b in enumerate(bs):
        assert_rel(row_delta(torch.chunk(u, tp, dim=0)[rank], b, SCALE), torch.chunk(want, tp, dim=0)[rank],
                   f"{module} sequence parallel rank {rank}/{tp}")


def test_sequence_parallel_column_gathers_a_x_over_tokens(wm):
    """Column-parallel with sequence parallelism: each rank computes A x on its own tokens; the
    all-gather over tokens (simulated: this rank's u next to the other ranks') makes u whole, and
    each rank's rows for all tokens are the unsharded result's."""
    layer, module, tp = 1, "self_attention.linear_qkv", 2
    names = layer_targets(wm, layer, ["q_proj", "k_proj", "v_proj"])[module]
    lora = _random_lora(wm, names, seed=4)
    x = torch.randn(6, 2, TINY["hidden_size"], generator=torch.Generator().manual_seed(5))
    full = _fused_delta(wm, layer, module, lora)
    plans = [plan_module(wm, layer, module, names, COLUMN, tp, rank) for rank in range(tp)]
    x_local = torch.chunk(x, tp, dim=0)
    # A is replicated, so every rank's local u is the same function of its tokens
    a0 = [plans[0].shard(br, *lora[n])[0] for br, n in zip(plans[0].branches, names)]
    u_local = [torch.cat([row_partial(xs, a_j) for a_j in a0], dim=-1) for xs in x_local]
    for rank, plan in enumerate(plans):
        a, b = zip(*(plan.shard(br, *lora[n]) for br, n in zip(plan.branches, names)))

        def all_gather_tokens(u, rank=rank):
            torch.testing.assert_close(u, u_local[rank], rtol=0, atol=0)
            return torch.cat([u if s == rank else u_local[s] for s in range(tp)], dim=0)

        got = column_delta(x_local[rank], a, b, [br.rows for br in plan.branches], plan.out_local, SCALE,
                           share=all_gather_tokens)
        assert_rel(got, x.double() @ megatron_shard(full, tp, rank).T, f"sequence parallel rank {rank}")


def test_layout_cutting_a_query_group_is_refused(wm):
    """TP4 with 2 query groups would cut a group in half: k_proj has no rows on rank 0."""
    with pytest.raises(UserError, match="not one contiguous chunk"):
        plan_module(wm, 1, "self_attention.linear_qkv", ["model.layers.1.self_attn.k_proj.weight"], COLUMN, 4, 0)


# ------------------------------------------------------------------------------ fused norm input
def test_fused_input_norm_equals_the_zero_centered_rmsnorm():
    """A TE LayerNorm-linear's LoRA input is its own norm of x (recomputed from its attributes)."""
    from types import SimpleNamespace

    from qnext.megatron.norm import RMSNorm

    cfg = SimpleNamespace(layernorm_zero_centered_gamma=True, params_dtype=torch.float32, use_cpu_initialization=True)
    norm = RMSNorm(cfg, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    te_like = torch.nn.Module()
    te_like.layer_norm_weight = norm.weight
    te_like.eps, te_like.zero_centered_gamma, te_like.normalization = 1e-6, True, "RMSNorm"
    x = torch.randn(4, 16)
    torch.testing.assert_close(fused_input_norm(te_like, x), norm(x), rtol=0, atol=0)
    te_like.normalization, te_like.zero_centered_gamma = "LayerNorm", False
    te_like.layer_norm_bias = torch.nn.Parameter(torch.randn(16))
    want = torch.nn.functional.layer_norm(x, (16,), norm.weight, te_like.layer_norm_bias, 1e-6)
    torch.testing.assert_close(fused_input_norm(te_like, x), want, **TOL)


# ------------------------------------------------------------------------------ real megatron linears, TP1
@pytest.fixture(scope="module")
def world():
    pytest.importorskip("megatron.core")
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel(backend="gloo")
    yield


def _linear(kind: str, in_f: int, out_f: int):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=in_f, num_attention_heads=1, use_cpu_initialization=True,
                            params_dtype=torch.float32)
    init = lambda w: torch.nn.init.normal_(w, std=0.1)  # noqa: E731
    if kind == COLUMN:
        return ColumnParallelLinear(in_f, out_f, config=cfg, init_method=init, bias=False, gather_output=False)
    return RowParallelLinear(in_f, out_f, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                             skip_bias_add=False)


@pytest.mark.parametrize("layer,module,targets,kind", [
    (1, "self_attention.linear_qkv", ["q_proj", "v_proj"], COLUMN),
    (0, "self_attention.in_proj", ["in_proj_qkvz", "in_proj_ba"], COLUMN),
    (1, "self_attention.linear_proj", ["o_proj"], ROW),
])
def test_lora_linear_on_megatron_modules(world, wm, layer, module, targets, kind):
    """attach -> forward = base + LoRA; merge folds it into the weight; the sharded state dict
    keeps the base key and adds HF-shaped LoRA keys; detach restores the original module."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from qnext.lora.layers import LoraLinear, attach, detach, parallel_kind

    names = layer_targets(wm, layer, targets)[module]
    plan = plan_module(wm, layer, module, names, kind, 1, 0)
    in_f = wm.hf_shapes[names[0]][1]
    out_f = plan.out_local
    lin = _linear(kind, in_f, out_f)
    assert parallel_kind(lin) == kind
    base_cls = type(lin)
    w0 = lin.weight.detach().clone()
    x = torch.randn(7, 2, in_f)
    base_out, _ = lin(x)
    attach(lin, plan, r=R, alpha=R * SCALE)
    assert isinstance(lin, LoraLinear) and isinstance(lin, (ColumnParallelLinear, RowParallelLinear))
    out0, _ = lin(x)
    torch.testing.assert_close(out0, base_out, rtol=0, atol=0)  # B starts at zero
    lora = _random_lora(wm, names, seed=7)
    with torch.no_grad():
        for br, n in zip(plan.branches, names):
            a, b = plan.shard(br, *lora[n])
            lin.lora[br.name].lora_A.copy_(a)
            lin.lora[br.name].lora_B.copy_(b)
    out, _ = lin(x)
    if kind == COLUMN:
        want = base_out.double() + x.double() @ megatron_shard(_fused_delta(wm, layer, module, lora), 1, 0).T
    else:
        a_full, b_full = lora[names[0]]
        want = base_out.double() + SCALE * x.double() @ (b_full.double() @ a_full.double()).T
    assert_rel(out, want, f"{module} forward")
    lin.merge_lora()
    merged, _ = lin(x)
    assert_rel(merged, want, f"{module} merged forward")
    lin.unmerge_lora()  # w + d - d: float32 rounding of the size of the delta
    torch.testing.assert_close(lin.weight, w0, rtol=0, atol=1e-6 * float(lin.lora_weight_delta().abs().max()))
    # backward reaches the adapters only when the base is frozen
    lin.weight.requires_grad_(False)
    lin(x)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lin.lora.parameters())
    sd = lin.sharded_state_dict(prefix=f"decoder.layers.{layer}.{module}.")
    base_key = f"decoder.layers.{layer}.{module}.weight"
    assert isinstance(sd[base_key], ShardedTensor)
    for br, n in zip(plan.branches, names):
        rows, cols = wm.hf_shapes[n]
        st_a = sd[f"decoder.layers.{layer}.{module}.lora.{br.name}.lora_A"]
        st_b = sd[f"decoder.layers.{layer}.{module}.lora.{br.name}.lora_B"]
        assert tuple(st_a.global_shape) == (R, cols) and tuple(st_b.global_shape) == (rows, R)
    assert sorted(k for k in sd if ".lora." in k) == sorted(
        f"decoder.layers.{layer}.{module}.lora.{br.name}.lora_{f}" for br in plan.branches for f in "AB")
    detach(lin)
    assert type(lin) is base_cls and not hasattr(lin, "lora")
    # the merge round trip rounded the weight at the size of the (large, random) delta
    assert_rel(lin(x)[0], base_out.double(), "after detach (weight unmerged)", tol=1e-5)
