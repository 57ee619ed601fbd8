"""CPU tests of the Megatron Qwen3-Next model: config mapping, back-end selection, the TE-free
stack's checkpoint layout (built on CPU/meta in a gloo world of one) and the grouped experts.

GDN allocates on ``torch.cuda.current_device()``; ``construction_device`` answers ``cpu``/``meta``
instead, so the whole model builds here. Forward passes of GDN need fla's Triton kernels (GPU):
those are in tests/gpu/test_megatron_model.py.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models/tiny_qwen3_next/config.json"
BIG = REPO / "models/qwen3_next_80b_a3b/config.json"
FIXTURE = REPO / "tests/fixtures/megatron_manifest_tiny.json"

pytest.importorskip("megatron.core")


def tiny() -> dict:
    return json.loads(TINY.read_text())


# ------------------------------------------------------------------------------ config mapping
def test_config_maps_qwen3_next_features():
    from qnext.megatron.config import hf_to_transformer_config

    args = hf_to_transformer_config(BIG, None, torch.bfloat16)
    c = args.config
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels) == (48, 2048, 16, 2, 256)
    assert c.experimental_attention_variant == "gated_delta_net"
    assert c.linear_attention_freq == 4  # layers 3, 7, ... are full attention, like HF full_attention_interval
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim) == (
        16, 32, 128, 128,
    )
    assert c.linear_conv_kernel_dim == 4
    assert c.attention_output_gate and c.qk_layernorm and c.layernorm_zero_centered_gamma
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6
    assert c.gated_linear_unit and c.activation_func is torch.nn.functional.silu and not c.add_bias_linear
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (512, 10, 512)
    assert c.moe_shared_expert_intermediate_size == 512 and c.moe_shared_expert_gate
    assert c.moe_router_score_function == "softmax" and c.moe_router_pre_softmax is False  # norm_topk_prob
    assert c.moe_layer_freq == 1 and c.moe_router_dtype is None  # logits in bf16, as HF
    assert c.params_dtype == torch.bfloat16 and c.bf16
    assert c.transformer_impl == "local"
    assert args.rotary_percent == 0.25 and args.rotary_base == 1e7
    assert args.vocab_size == 151936 and not args.share_embeddings_and_output_weights
    kw = args.gpt_kwargs()
    assert kw["position_embedding_type"] == "rope" and kw["rotary_percent"] == 0.25


def test_config_norm_topk_prob_false_takes_softmax_over_all_experts():
    from qnext.megatron.config import hf_to_transformer_config

    cfg = tiny() | {"norm_topk_prob": False}
    assert hf_to_transformer_config(cfg).config.moe_router_pre_softmax is True


def test_config_layer_patterns_follow_hf_rules():
    from qnext.megatron.config import hf_to_transformer_config, layer_types, moe_layers

    cfg = tiny() | {"num_hidden_layers": 6, "full_attention_interval": 3, "mlp_only_layers": [0], "decoder_sparse_step": 1}
    assert layer_types(cfg) == ["linear_attention", "linear_attention", "full_attention"] * 2
    assert moe_layers(cfg) == [False, True, True, True, True, True]
    c = hf_to_transformer_config(cfg).config
    assert c.linear_attention_freq == 3
    assert c.moe_layer_freq == [0, 1, 1, 1, 1, 1]
    explicit = cfg | {"layer_types": ["full_attention"] + ["linear_attention"] * 5}
    assert hf_to_transformer_config(explicit).config.linear_attention_freq == [0, 1, 1, 1, 1, 1]


def test_config_parallel_sizes_and_errors():
    from qnext.errors import UserError
    from qnext.megatron.config import ParallelSizes, hf_to_transformer_config

    c = hf_to_transformer_config(BIG, {"tp": 2, "ep": 8, "pp": 4, "sequence_parallel": True}).config
    assert (c.tensor_model_parallel_size, c.expert_model_parallel_size, c.pipeline_model_parallel_size) == (2, 8, 4)
    assert c.sequence_parallel
    with pytest.raises(UserError, match="parallel.ep"):
        hf_to_transformer_config(TINY, ParallelSizes(ep=3))
    with pytest.raises(UserError, match="parallel.pp"):
        hf_to_transformer_config(TINY, ParallelSizes(pp=3))
    with pytest.raises(UserError, match="model_type"):
        hf_to_transformer_config(tiny() | {"model_type": "llama"})
    with pytest.raises(UserError, match="rope"):
        hf_to_transformer_config(tiny() | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    from qnext.config.schema import ParallelConfig

    assert ParallelSizes.of(ParallelConfig(tp=2, ep=4)) == ParallelSizes(tp=2, ep=4)


# ------------------------------------------------------------------------------ back-end selection
def _te_really_imports() -> bool:
    try:
        importlib.import_module("transformer_engine.pytorch")
        from megatron.core.extensions.transformer_engine import HAVE_TE

        return bool(HAVE_TE)
    except Exception:
        return False


def test_backend_selection_uses_the_real_import_check():
    from qnext.megatron.spec import LOCAL, TE, select_backend, te_importable

    expected = _te_really_imports()
    assert te_importable() == expected
    assert select_backend(None) == (TE if expected else LOCAL)
    assert select_backend(False) == LOCAL


def test_backend_selection_rules():
    from qnext.errors import UserError
    from qnext.megatron.spec import LOCAL, TE, select_backend

    assert select_backend(None, te_available=True) == TE
    assert select_backend(None, te_available=False) == LOCAL
    assert select_backend(True, te_available=True) == TE
    assert select_backend(False, te_available=True) == LOCAL
    with pytest.raises(UserError, match="transformer_engine"):
        select_backend(True, te_available=False)


@pytest.mark.skipif(_te_really_imports(), reason="TE is importable here: the TE-free path is not the default")
def test_te_free_path_is_selected_and_logged_here(caplog):
    from qnext.megatron.spec import LOCAL, select_backend

    with caplog.at_level("INFO", logger="qnext.megatron.spec"):
        assert select_backend() == LOCAL
    assert "TE-free" in caplog.text


def test_te_spec_is_megatrons_own_builder_and_needs_te_impl():
    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.spec import TE, block_spec

    c = hf_to_transformer_config(TINY).config  # transformer_impl="local"
    with pytest.raises(ValueError, match="transformer_impl"):
        block_spec(c, TE)


# ------------------------------------------------------------------------------ the model on CPU
@pytest.fixture(scope="module")
def world():
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    yield


def _cpu_model(world, hf=TINY, dtype=torch.float32, device="cpu"):
    from qnext.megatron.model import build_model
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device

    with construction_device(device):
        return build_model(hf, None, dtype, use_te=False, config_overrides=dict(CPU_BUILD_OVERRIDES))


def test_local_stack_modules(world):
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.attention import SelfAttention

    from qnext.megatron.attention import SDPAttention
    from qnext.megatron.experts import GroupedGemmExperts
    from qnext.megatron.norm import RMSNorm

    m = _cpu_model(world)
    assert m.qnext_backend == "local"
    layers = m.decoder.layers
    assert [type(l.self_attention).__name__ for l in layers] == ["QnextGatedDeltaNet", "SelfAttention"] * 2
    gdn, attn = layers[0], layers[1]
    assert isinstance(gdn.self_attention, GatedDeltaNet) and isinstance(gdn.input_layernorm, RMSNorm)
    assert type(gdn.self_attention.in_proj) is ColumnParallelLinear
    assert isinstance(gdn.self_attention.out_norm, RMSNorm)
    assert isinstance(attn.self_attention, SelfAttention)
    assert isinstance(attn.self_attention.core_attention, SDPAttention)
    assert isinstance(attn.self_attention.q_layernorm, RMSNorm)
    assert isinstance(gdn.mlp.experts, GroupedGemmExperts)
    assert gdn.mlp.shared_experts.use_shared_expert_gate
    assert isinstance(m.decoder.final_layernorm, RMSNorm)
    # zero-centered norms start at zero (x_hat * (1 + 0))
    assert torch.count_nonzero(gdn.input_layernorm.weight) == 0


def test_tiny_manifest_keys_on_cpu(world):
    from qnext.megatron.manifest import sharded_manifest

    man = sharded_manifest(_cpu_model(world))
    rows = {r["key"]: r for r in man["tensors"]}
    # TE names for the separate input norms; GDN in_proj/conv1d split per section
    assert "decoder.layers.0.self_attention.in_proj.layer_norm_weight" in rows
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in rows
    assert not any(k.endswith("input_layernorm.weight") for k in rows)
    sections = {"query": 64, "key": 64, "value": 128, "z": 128, "beta": 4, "alpha": 4}
    for name, rows_n in sections.items():
        assert rows[f"decoder.layers.0.self_attention.in_proj.weight.{name}"]["global_shape"] == [rows_n, 128]
    assert rows["decoder.layers.0.self_attention.conv1d.weight.value"]["global_shape"] == [128, 1, 4]
    # linear_qkv: per KV group [2 q heads, 2 gate heads, k, v] x 32 = 192 rows, 2 groups
    assert rows["decoder.layers.1.self_attention.linear_qkv.weight"]["global_shape"] == [384, 128]
    # routed experts stacked on a leading expert axis, SequentialMLP's key
    assert rows["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"]["global_shape"] == [8, 128, 128]
    assert rows["decoder.layers.0.mlp.experts.experts.linear_fc2.weight"]["global_shape"] == [8, 128, 64]
    assert rows["decoder.layers.0.mlp.shared_experts.gate_weight"]["global_shape"] == [1, 128]
    assert rows["embedding.word_embeddings.weight"]["global_shape"] == [151936, 128]
    assert rows["output_layer.weight"]["global_shape"] == [151936, 128]
    assert all(r["dtype"] == "float32" for r in man["tensors"])


@pytest.mark.skipif(not FIXTURE.exists(), reason="golden manifest not captured yet (tools/dump_megatron_manifest.py on a GPU)")
def test_cpu_manifest_equals_golden_gpu_manifest(world):
    from qnext.megatron.manifest import compare_manifests, sharded_manifest

    golden = json.loads(FIXTURE.read_text())
    dtype = getattr(torch, golden["provenance"]["params_dtype"])
    ours = sharded_manifest(_cpu_model(world, dtype=dtype, device="meta"))
    assert compare_manifests(golden, ours) == []


def test_real_width_model_builds_on_meta(world):
    from qnext.megatron.manifest import sharded_manifest

    cfg = json.loads(BIG.read_text()) | {"num_hidden_layers": 4}
    rows = {r["key"]: r for r in sharded_manifest(_cpu_model(world, cfg, torch.bfloat16, "meta"))["tensors"]}
    assert rows["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"]["global_shape"] == [512, 1024, 2048]
    assert rows["decoder.layers.0.self_attention.in_proj.weight.value"]["global_shape"] == [4096, 2048]
    assert rows["decoder.layers.3.self_attention.linear_qkv.weight"]["global_shape"] == [16 * 256 * 2 + 2 * 2 * 256, 2048]


# ------------------------------------------------------------------------------ grouped experts
def _expert_pair(world, num_experts=6, hidden=32, ffn=16):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.experts import GroupedGemmExperts
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES

    cfg = tiny() | {"hidden_size": hidden, "moe_intermediate_size": ffn, "num_experts": num_experts}
    tc = hf_to_transformer_config(cfg, None, torch.float32, **CPU_BUILD_OVERRIDES).config
    tc.perform_initialization = True
    pgs = get_default_pg_collection()
    seq = SequentialMLP(num_experts, tc, MLPSubmodules(ColumnParallelLinear, RowParallelLinear), pg_collection=pgs)
    grp = GroupedGemmExperts(num_experts, tc, pg_collection=pgs)
    with torch.no_grad():
        for e, mlp in enumerate(seq.local_experts):
            mlp.linear_fc1.weight.normal_(0, 0.1)
            mlp.linear_fc2.weight.normal_(0, 0.1)
            grp.linear_fc1.weight[e].copy_(mlp.linear_fc1.weight)
            grp.linear_fc2.weight[e].copy_(mlp.linear_fc2.weight)
    return seq, grp


def test_grouped_experts_equal_sequential_on_cpu(world):
    seq, grp = _expert_pair(world)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 32)
    probs = torch.rand(x.shape[0])
    results = []
    for mod in (seq, grp):
        xi = x.clone().requires_grad_(True)
        out, _ = mod(xi, counts, probs)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), xi.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    w1_seq = torch.stack([m.linear_fc1.weight.grad for m in seq.local_experts])
    torch.testing.assert_close(grp.linear_fc1.weight.grad, w1_seq, rtol=1e-5, atol=1e-6)
    assert grp.linear_fc1.weight.allreduce is True and grp.linear_fc1.weight.partition_dim == 1


def _sharded_rows(sd) -> list[tuple]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    apply_factories(sd)
    rows = []
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            rows.append((v.key, v.global_shape, v.global_offset, v.local_shape, v.axis_fragmentations,
                         v.replica_id, v.prepend_axis_num, v.dtype))
        elif isinstance(v, ShardedObject):
            rows.append((v.key, v.global_shape, v.global_offset, v.replica_id, v.data))
    return sorted(rows, key=repr)


@pytest.mark.parametrize("singleton", [False, True])
def test_grouped_experts_checkpoint_layout_equals_sequential(world, singleton):
    seq, grp = _expert_pair(world)
    meta = {"singleton_local_shards": singleton}
    prefix = "decoder.layers.0.mlp.experts."
    assert _sharded_rows(grp.sharded_state_dict(prefix, (), meta)) == _sharded_rows(seq.sharded_state_dict(prefix, (), meta))
    # with a prepended (e.g. stacked-layer) axis too
    offs = ((0, 2, 4),)
    assert _sharded_rows(grp.sharded_state_dict(prefix, offs, meta)) == _sharded_rows(seq.sharded_state_dict(prefix, offs, meta))


def test_grouped_experts_factory_merge_restores_the_parameter(world):
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, apply_factories, apply_factory_merges

    _, grp = _expert_pair(world)
    sd = {k: v for k, v in grp.sharded_state_dict("p.", (), {}).items() if isinstance(v, ShardedTensorFactory)}
    factories = dict(sd)
    apply_factories(sd)
    loaded = {k: [sh.data.clone() for sh in v] for k, v in sd.items()}
    merged = apply_factory_merges(loaded, factories)
    torch.testing.assert_close(merged["p.linear_fc1.weight"], grp.linear_fc1.weight.detach())
    torch.testing.assert_close(merged["p.linear_fc2.weight"], grp.linear_fc2.weight.detach())


# ------------------------------------------------------------------------------ norm and attention
def test_zero_centered_rmsnorm_matches_hf():
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.norm import RMSNorm

    c = hf_to_transformer_config(TINY, None, torch.float32, use_cpu_initialization=True).config
    ours, ref = RMSNorm(c, 64, eps=1e-6), Qwen3NextRMSNorm(64, eps=1e-6)
    w = torch.randn(64) * 0.1
    with torch.no_grad():
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), ref(x))


def test_sdpa_attention_gqa_causal_and_packed():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from qnext.megatron.attention import SDPAttention
    from qnext.megatron.config import hf_to_transformer_config

    class _PG:  # a TP group of one without torch.distributed
        tp = type("G", (), {"size": staticmethod(lambda: 1)})()

    c = hf_to_transformer_config(TINY, None, torch.float32).config
    attn = SDPAttention(c, 1, AttnMaskType.causal, pg_collection=_PG())
    s, b, nh, ng, hd = 10, 2, 4, 2, 32
    q, k, v = torch.randn(s, b, nh, hd), torch.randn(s, b, ng, hd), torch.randn(s, b, ng, hd)
    out = attn(q, k, v, None)
    # reference: explicit softmax with repeated KV heads and a causal mask
    kr, vr = k.repeat_interleave(nh // ng, 2), v.repeat_interleave(nh // ng, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kr) / hd**0.5
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vr).reshape(s, b, nh * hd)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # packed: two samples [0, 4) and [4, 10) of batch row 0 equal two separate calls
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    packed = attn(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=psp)
    first = attn(q[:4, :1], k[:4, :1], v[:4, :1], None).reshape(4, -1)
    second = attn(q[4:, :1], k[4:, :1], v[4:, :1], None).reshape(6, -1)
    torch.testing.assert_close(packed, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


def test_packed_attention_masked_equals_the_per_sample_loop(monkeypatch):
    """QNEXT_PACKED_ATTENTION=masked (one SDPA call per pack) gives the per-sample loop's outputs and
    gradients, also with tokens after the last boundary (their output is zero in both)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from qnext.errors import UserError
    from qnext.megatron.attention import SDPAttention
    from qnext.megatron.config import hf_to_transformer_config

    class _PG:
        tp = type("G", (), {"size": staticmethod(lambda: 1)})()

    c = hf_to_transformer_config(TINY, None, torch.float32).config
    attn = SDPAttention(c, 1, AttnMaskType.causal, pg_collection=_PG())
    t, nh, ng, hd = 23, 4, 2, 32
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(t, n, hd, generator=g, dtype=torch.float64) for n in (nh, ng, ng)]
    cu = torch.tensor([0, 5, 6, 14, 20], dtype=torch.int32)  # a 1-token sample, and 3 tokens after the last
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    results = {}
    for mode in ("loop", "masked", "varlen"):  # varlen: flash on CUDA only, so the loop here
        monkeypatch.setenv("QNEXT_PACKED_ATTENTION", mode)
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        out = attn(q, k, v, None, packed_seq_params=psp)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        results[mode] = (out.detach(), q.grad, k.grad, v.grad)
    assert float(results["loop"][0][20:].abs().max()) == 0.0
    for a, b in zip(results["loop"], results["masked"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(results["loop"], results["varlen"]))
    monkeypatch.setenv("QNEXT_PACKED_ATTENTION", "fast")
    with pytest.raises(UserError, match="QNEXT_PACKED_ATTENTION"):
        attn(*base, None, packed_seq_params=psp)
    from qnext.megatron.prepare import prepare

    with pytest.raises(UserError, match="QNEXT_PACKED_ATTENTION='fast'"):  # the entry stops before any model is built
        prepare(["model=tiny_qwen3_next", "parallel=1gpu"], world_size=1)


def test_thd_rope_in_one_pass_is_bit_equal_to_megatrons_loop(world):
    """qnext.megatron.compat' RoPE for packed sequences against megatron's per-sequence loop: the same
    values and gradients, bit for bit, with Qwen3-Next's partial rotary dimension."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from qnext.megatron.compat.thd_rope import _thd_rope_vectorized, install_thd_rope_vectorized
    from qnext.megatron.parallel import construction_device

    assert install_thd_rope_vectorized()
    fixed = rope_utils._apply_rotary_pos_emb_thd
    original = fixed.__wrapped__
    assert fixed.qnext_fixed and not getattr(original, "qnext_fixed", False)
    with construction_device("cpu"):  # megatron's RotaryEmbedding computes on the current CUDA device
        freqs = RotaryEmbedding(kv_channels=32, rotary_percent=0.25, rotary_base=10_000_000,
                                use_cpu_initialization=True)(24)  # [24, 1, 1, 8]: 8 of 32 channels rotate
    # (a table longer than the pack: megatron's "traditional" positions, each sequence from 0)
    cu = torch.tensor([0, 3, 4, 13, 16], dtype=torch.int32)
    x0 = torch.randn(16, 4, 32, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    cp = ps.get_context_parallel_group()
    outs = []
    for fn in (original, _thd_rope_vectorized(original)):
        x = x0.clone().requires_grad_(True)
        y = fn(x, cu, freqs, cp_group=cp)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).sin()).sum().backward()
        outs.append((y.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0][:, :, :8], x0[:, :, :8]) and torch.equal(outs[0][0][:, :, 8:], x0[:, :, 8:])


def test_another_megatron_core_version_is_warned_about_once(monkeypatch):
    from qnext.megatron.compat import _patching as fixes

    monkeypatch.setattr(fixes, "_version_checked", False)
    with pytest.warns(RuntimeWarning, match="megatron-core 0.20.0 is installed"):
        assert "0.20.0" in fixes.check_megatron_core_version("0.20.0")
    assert fixes.check_megatron_core_version("0.20.0") is None  # once per process
    monkeypatch.setattr(fixes, "_version_checked", False)
    assert fixes.check_megatron_core_version(fixes.PINNED_MEGATRON_CORE) is None
    monkeypatch.setattr(fixes, "_version_checked", False)
    assert fixes.check_megatron_core_version() is None  # this environment has the pinned version
