"""GPU checks of the Megatron Qwen3-Next model (TE-free stack), one process, a world of one.

- grouped-GEMM experts == megatron's SequentialMLP (outputs and grads, bf16 tolerance);
- the tiny model runs forward and backward;
- with HF weights copied in directly (an independent oracle, not the converter), the logits equal
  HF transformers' Qwen3NextForCausalLM on the same tokens.

Run: ``pytest -q -m gpu tests/gpu/test_megatron_model.py`` (prints the numbers it compares).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models/tiny_qwen3_next/config.json"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def world():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    yield
    # groups stay up for the remaining tests of the session; destroyed at exit


# ------------------------------------------------------------------------------------ experts
def _expert_pair(dtype, num_experts=16, hidden=256, ffn=128):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.experts import GroupedGemmExperts

    cfg = json.loads(TINY.read_text())
    cfg.update(hidden_size=hidden, moe_intermediate_size=ffn, num_experts=num_experts)
    tc = hf_to_transformer_config(cfg, None, dtype).config
    pgs = get_default_pg_collection()
    seq = SequentialMLP(
        num_experts, tc, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        pg_collection=pgs,
    ).cuda()
    grp = GroupedGemmExperts(num_experts, tc, pg_collection=pgs).cuda()
    with torch.no_grad():
        for e, mlp in enumerate(seq.local_experts):
            grp.linear_fc1.weight[e].copy_(mlp.linear_fc1.weight)
            grp.linear_fc2.weight[e].copy_(mlp.linear_fc2.weight)
    return seq, grp


def _routed_inputs(num_experts, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (num_experts,), generator=g)
    counts[1] = 0  # an expert without tokens
    counts[-1] = 0
    t = int(counts.sum())
    x = torch.randn(t, hidden, generator=g).to(dtype).cuda()
    probs = torch.rand(t, generator=g).cuda()
    return x, counts, probs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_experts_match_sequential(world, dtype):
    from qnext.megatron.experts import grouped_mm_usable

    seq, grp = _expert_pair(dtype)
    x, counts, probs = _routed_inputs(16, 256, dtype)
    # bf16 on the GPU must take the fused grouped GEMM (float32 takes the per-expert loop)
    assert grouped_mm_usable(x, grp.linear_fc1.weight) == (dtype == torch.bfloat16)
    outs, grads = {}, {}
    for name, mod in (("sequential", seq), ("grouped", grp)):
        xi = x.clone().requires_grad_(True)
        out, bias = mod(xi, counts.clone(), probs)
        assert bias is None
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).cuda()
        out.backward(gout)
        outs[name] = out.detach()
        if name == "sequential":
            w1 = torch.stack([m.linear_fc1.weight.grad for m in mod.local_experts])
            w2 = torch.stack([m.linear_fc2.weight.grad for m in mod.local_experts])
        else:
            w1, w2 = mod.linear_fc1.weight.grad, mod.linear_fc2.weight.grad
        grads[name] = {"x": xi.grad, "fc1": w1, "fc2": w2}
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    errs = {"out": rel(outs["grouped"], outs["sequential"])}
    errs.update({k: rel(grads["grouped"][k], grads["sequential"][k]) for k in ("x", "fc1", "fc2")})
    print(f"grouped vs sequential ({dtype}):", {k: f"{v:.2e}" for k, v in errs.items()})
    assert all(v < tol for v in errs.values()), errs


# ------------------------------------------------------------------------------------ model
def _tiny_model(dtype, **overrides):
    from qnext.megatron.model import build_model

    return build_model(TINY, None, dtype, use_te=False, config_overrides=overrides or None)


@pytest.mark.parametrize("gdn_kernel", ["fla", "torch"])
def test_tiny_model_forward_backward(world, gdn_kernel):
    overrides = {"deterministic_mode": True} if gdn_kernel == "torch" else {}
    model = _tiny_model(torch.bfloat16, **overrides)
    model.train()
    tokens = torch.randint(0, 151936, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, 64)
    loss = model(tokens, pos, None, labels=tokens.roll(-1, 1))
    assert loss.shape == (2, 64) and torch.isfinite(loss).all()
    try:
        loss.float().mean().backward()
    except Exception as err:  # fla's gated backward is refused on Hopper with Triton [3.4, 3.7.1)
        if gdn_kernel == "fla" and "incorrect results" in str(err):
            pytest.skip(f"fla backward refused here: {str(err)[:200]}")
        raise
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    print(f"{gdn_kernel}: loss {loss.float().mean().item():.4f}, {len(grads)} params with grads")
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any("mlp.experts.linear_fc1" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert any("self_attention.in_proj" in n and g.abs().sum() > 0 for n, g in grads.items())


# ------------------------------------------------------------------------------------ HF oracle
def hf_to_megatron_tp1(hf_sd: dict, cfg: dict) -> dict:
    """Independent oracle of the weight mapping at TP=EP=PP=1 (in-memory names on both sides)."""
    out = {
        "embedding.word_embeddings.weight": hf_sd["model.embed_tokens.weight"],
        "output_layer.weight": hf_sd["lm_head.weight"],
        "decoder.final_layernorm.weight": hf_sd["model.norm.weight"],
    }
    nk, dk = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"]
    nv, dv = cfg["linear_num_value_heads"], cfg["linear_value_head_dim"]
    r = nv // nk
    nh, ng, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    hidden = cfg["hidden_size"]
    interval = cfg["full_attention_interval"]
    for i in range(cfg["num_hidden_layers"]):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = hf_sd[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf_sd[h + "post_attention_layernorm.weight"]
        if (i + 1) % interval:  # Gated DeltaNet
            a = h + "linear_attn."
            qkvz = hf_sd[a + "in_proj_qkvz.weight"].view(nk, 2 * dk + 2 * r * dv, hidden)
            q, k, v, z = torch.split(qkvz, [dk, dk, r * dv, r * dv], dim=1)
            ba = hf_sd[a + "in_proj_ba.weight"].view(nk, 2 * r, hidden)
            b, al = torch.split(ba, [r, r], dim=1)
            out[m + "self_attention.in_proj.weight"] = torch.cat(
                [t.reshape(-1, hidden) for t in (q, k, v, z, b, al)], dim=0
            )
            out[m + "self_attention.conv1d.weight"] = hf_sd[a + "conv1d.weight"]
            out[m + "self_attention.A_log"] = hf_sd[a + "A_log"]
            out[m + "self_attention.dt_bias"] = hf_sd[a + "dt_bias"]
            out[m + "self_attention.out_norm.weight"] = hf_sd[a + "norm.weight"] - 1.0
            out[m + "self_attention.out_proj.weight"] = hf_sd[a + "out_proj.weight"]
        else:  # gated attention
            a = h + "self_attn."
            qg = hf_sd[a + "q_proj.weight"].view(ng, nh // ng, 2, hd, hidden)
            k = hf_sd[a + "k_proj.weight"].view(ng, 1, hd, hidden)
            v = hf_sd[a + "v_proj.weight"].view(ng, 1, hd, hidden)
            q, gate = qg[:, :, 0], qg[:, :, 1]
            out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, gate, k, v], dim=1).reshape(-1, hidden)
            out[m + "self_attention.q_layernorm.weight"] = hf_sd[a + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = hf_sd[a + "k_norm.weight"]
            out[m + "self_attention.linear_proj.weight"] = hf_sd[a + "o_proj.weight"]
        e = h + "mlp."
        out[m + "mlp.router.weight"] = hf_sd[e + "gate.weight"]
        out[m + "mlp.experts.linear_fc1.weight"] = hf_sd[e + "experts.gate_up_proj"]  # [E, 2F, H]: [gate; up]
        out[m + "mlp.experts.linear_fc2.weight"] = hf_sd[e + "experts.down_proj"]
        out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
            [hf_sd[e + "shared_expert.gate_proj.weight"], hf_sd[e + "shared_expert.up_proj.weight"]]
        )
        out[m + "mlp.shared_experts.linear_fc2.weight"] = hf_sd[e + "shared_expert.down_proj.weight"]
        out[m + "mlp.shared_experts.gate_weight"] = hf_sd[e + "shared_expert_gate.weight"]
    return out


def _random_hf_model(cfg: dict, seed: int = 0):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    hf = Qwen3NextForCausalLM(Qwen3NextConfig(**cfg)).float()
    with torch.no_grad():  # norms away from their init so the (1 + w) conventions matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2 and p.std() == 0:
                p.normal_(0, 0.02)
    return hf.cuda().eval()


def test_megatron_matches_hf_oracle(world):
    cfg = json.loads(TINY.read_text())
    hf32 = _random_hf_model(cfg)
    hf_sd = {k: v.detach() for k, v in hf32.state_dict().items()}
    tokens = torch.randint(0, cfg["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1)).cuda()
    pos = torch.arange(48, device="cuda").unsqueeze(0).expand(2, 48)
    with torch.no_grad():
        ref32 = hf32(tokens).logits.float()
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
        ref16 = hf16(tokens).logits.float()
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _tiny_model(dtype)
        mapped = hf_to_megatron_tp1(hf_sd, cfg)
        missing = model.load_state_dict({k: v.to(dtype) for k, v in mapped.items()}, strict=False)
        assert not [k for k in missing.missing_keys if not k.endswith("_extra_state")], missing.missing_keys
        assert not missing.unexpected_keys, missing.unexpected_keys
        model.eval()
        with torch.no_grad():
            logits = model(tokens, pos, None).float()
        results[str(dtype)] = {"vs_hf_fp32": rel(logits, ref32), "vs_hf_bf16": rel(logits, ref16)}
    results["hf_bf16_vs_hf_fp32"] = rel(ref16, ref32)
    print("megatron vs HF (rel L2):", json.dumps(results, indent=1))
    assert results["torch.float32"]["vs_hf_fp32"] < 5e-3, results
    # bf16 tolerance as in benchmarks/megatron_hf_parity.py: 3% relative L2 or twice HF's own bf16 error
    assert results["torch.bfloat16"]["vs_hf_fp32"] < max(2 * results["hf_bf16_vs_hf_fp32"], 3e-2), results


@pytest.mark.parametrize("mode", ["masked", "varlen"])
def test_packed_attention_modes_match_the_per_sample_loop(world, monkeypatch, mode):
    """QNEXT_PACKED_ATTENTION=masked / varlen against the per-sample loop on the GPU, in bf16, at
    Qwen3-Next's attention shapes (16 query heads, 2 KV groups, head dim 256): outputs and the gradients
    of q, k, v, on a pack with a 1-token sample and tokens after the last boundary."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from qnext.megatron.attention import SDPAttention, varlen_usable
    from qnext.megatron.config import hf_to_transformer_config

    hf = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text())
    nh, ng, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    attn = SDPAttention(hf_to_transformer_config(hf, None, torch.bfloat16).config, 1, AttnMaskType.causal)
    g = torch.Generator().manual_seed(0)
    t = 700
    base = [torch.randn(t, n, hd, generator=g).cuda().bfloat16() for n in (nh, ng, ng)]
    cu = torch.tensor([0, 1, 130, 300, 301, 650], dtype=torch.int32, device="cuda")
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=350, max_seqlen_kv=350)
    grad = torch.randn(t, nh * hd, generator=g).cuda().bfloat16()
    res = {}
    for m in ("loop", mode):
        monkeypatch.setenv("QNEXT_PACKED_ATTENTION", m)
        q, k, v = (x.clone().requires_grad_(True) for x in base)
        out = attn(q, k, v, None, packed_seq_params=psp)
        out.backward(grad)
        res[m] = [out.detach(), q.grad, k.grad, v.grad]
    if mode == "varlen":
        assert varlen_usable(base[0])
    errs = [rel(a.float(), b.float()) for a, b in zip(res[mode], res["loop"])]
    print(f"{mode} vs loop, rel L2 (out, dq, dk, dv): {errs}")
    assert float(res[mode][0][650:].abs().max()) == 0.0
    assert max(errs) < 2e-2, errs


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2)])  # the training dtype; a wrong head map is O(1)
def test_fast_paths_match_the_reference_paths(world, monkeypatch, dtype, tol):
    """The tiny model on a packed row with qnext's fast paths (fla-native Gated DeltaNet: in-kernel q/k
    norm, grouped value heads, host cu_seqlens; the sorted MoE dispatcher; compiled SwiGLU and RMSNorm;
    fla's fused cross-entropy)
    against the same weights on the reference paths (megatron's GDN preparation and dispatcher, plain
    ops): per-token losses and every parameter's gradient."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from qnext.megatron.dispatch import SortedTokenDispatcher
    from qnext.megatron.data import attach_host_copy

    cu_host = torch.tensor([0, 100, 101, 180, 256], dtype=torch.int32)
    tokens = torch.randint(0, 151936, (1, 256), generator=torch.Generator().manual_seed(3)).cuda()
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cu_host[:-1].tolist(), cu_host[1:].tolist())]).cuda()[None]
    res = {}
    state = None
    for name, env in (("reference", {"QNEXT_GDN_FLA_NATIVE": "0", "QNEXT_MOE_DISPATCH": "megatron", "QNEXT_FUSED": "0",
                                    "QNEXT_FLA_LOSS": "0"}),
                      ("fast", {"QNEXT_GDN_FLA_NATIVE": "1", "QNEXT_MOE_DISPATCH": "sorted", "QNEXT_FUSED": "1",
                               "QNEXT_FLA_LOSS": "1"})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        model = _tiny_model(dtype)
        gdn, moe = model.decoder.layers[0].self_attention, model.decoder.layers[0].mlp
        assert gdn.fla_native == (name == "fast")
        assert isinstance(moe.token_dispatcher, SortedTokenDispatcher) == (name == "fast")
        if state is None:
            state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        else:
            model.load_state_dict(state, strict=False)
        model.train()
        cu = attach_host_copy(cu_host.cuda(), cu_host)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=100, max_seqlen_kv=100)
        loss = model(tokens, pos, None, labels=tokens.roll(-1, 1), packed_seq_params=psp)
        (loss.float() * torch.linspace(0.5, 1.5, loss.numel(), device="cuda").view_as(loss)).sum().backward()
        res[name] = (loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    (l_ref, g_ref), (l_fast, g_fast) = res["reference"], res["fast"]
    errs = {"loss": rel(l_fast, l_ref)}
    # in bf16 the GDN A_log/dt_bias gradients are sums whose per-token terms cancel 17-22x (FINDINGS.md):
    # rounding moves them by tens of percent between equally valid orders; fp32 checks them
    cancel = ("A_log", "dt_bias") if dtype == torch.bfloat16 else ()
    errs.update({n: rel(g_fast[n], g_ref[n]) for n in g_ref if not n.endswith(cancel)})
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:6]
    print(f"{dtype}: fast vs reference, worst rel L2: {worst}")
    assert g_fast.keys() == g_ref.keys()
    assert errs["loss"] < tol / 5, worst
    assert max(errs.values()) < tol, worst


def test_grad_accum_fusion_matches_the_unfused_gradient():
    """The stand-in for Apex's fused wgrad accumulation (qnext.megatron.compat.grad_accum) on CUDA: one
    cuBLAS GEMM of bf16 inputs into the fp32 main_grad (torch.addmm with out_dtype, beta = 1) against the
    fp32 product of the same bf16 values added to it; and megatron's linear with it against the unfused one
    (the bf16 weight gradient added by the DDP hook), which differs by that gradient's bf16 rounding only."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from qnext.megatron.compat.grad_accum import wgrad_accum_reference, wgrad_gemm_accum_fp32

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2048, device="cuda", generator=gen).bfloat16()
    g = torch.randn(4096, 1536, device="cuda", generator=gen).bfloat16()
    start = torch.randn(1536, 2048, device="cuda", generator=gen)
    fused, ref = start.clone(), start.clone()
    wgrad_gemm_accum_fp32(x, g, fused)
    wgrad_accum_reference(x, g, ref)
    unfused = start + (g.t() @ x).float()  # megatron without fusion: bf16 wgrad, then main_grad.add_
    err = float((fused - ref).norm() / (ref - start).norm())
    err_unfused = float((unfused - ref).norm() / (ref - start).norm())
    print(f"grad-accum fusion vs fp32 reference: rel L2 {err:.2e}; unfused bf16 wgrad: {err_unfused:.2e}")
    assert fused.data_ptr() != ref.data_ptr() and err < 1e-5 and err <= err_unfused


def test_main_grad_compiled_add_matches_eager_on_gpu():
    """DDP's main_grad accumulation compiled (qnext.megatron.compat.main_grad) on CUDA: a bf16 gradient the
    size of one proxy expert stack added into an fp32 view of a larger buffer equals the eager ``add_`` bit for
    bit, in place, and the buffer around the view is untouched; the time of each is printed."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    import time

    from qnext.megatron.compat.main_grad import accumulate, accumulate_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 512 * 2048 * 512
    buf = torch.randn(n + 4096, device="cuda", generator=gen)
    grad = torch.randn(512, 2048, 512, device="cuda", generator=gen).bfloat16()
    ref = buf.clone()
    accumulate_reference(ref[1024:1024 + n].view(512, 2048, 512), grad)
    view = buf[1024:1024 + n].view(512, 2048, 512)
    accumulate(view, grad)
    assert view.data_ptr() == buf.data_ptr() + 4 * 1024 and torch.equal(buf, ref)
    times = {}
    for name, fn in (("eager add_", accumulate_reference), ("compiled", accumulate)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn(view, grad)
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t) / 10
    print("main_grad += bf16 grad, 537M values: " + ", ".join(
        f"{k} {v * 1e3:.2f} ms ({10 * n / v / 1e12:.2f} TB/s)" for k, v in times.items()))


def test_grouped_wgrad_kernel_matches_the_reference_on_gpu():
    """The experts' weight gradient accumulated into fp32 main_grad by the Triton kernel
    (qnext.megatron.grouped_wgrad) against the per-expert fp32 addmm reference, at the 80B config's expert
    shapes with ragged token counts (some experts without tokens: left untouched); the time of the kernel and
    of the unfused path it replaces (bf16 grouped-GEMM gradient, then the compiled main_grad add) is printed."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    import time

    from qnext.megatron.compat.main_grad import accumulate
    from qnext.megatron.grouped_wgrad import kernel_applies, wgrad_accum, wgrad_accum_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((1024, 2048), (2048, 512)):
        counts = torch.randint(0, 321, (512,), device="cuda", generator=gen)
        counts[::7] = 0
        offsets = counts.cumsum(0).to(torch.int32)
        rows = int(offsets[-1])
        x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
        dy = torch.randn(rows, n, device="cuda", generator=gen).bfloat16()
        start = torch.randn(512, n, k, device="cuda", generator=gen)
        assert kernel_applies(x, dy, start, offsets)
        got, want = start.clone(), start.clone()
        wgrad_accum(x, dy, None, offsets, got)
        wgrad_accum_reference(x, dy, None, offsets, want)
        rel = float((got - want).norm() / (want - start).norm())
        assert rel < 1e-5, (n, k, rel)
        assert torch.equal(got[::7], start[::7])  # experts without tokens
        del want, start
        times = {}
        for name, fn in (("fused kernel", lambda: wgrad_accum(x, dy, None, offsets, got)),
                         ("bf16 grouped GEMM + add", lambda: accumulate(got, torch._grouped_mm(dy.t(), x, offs=offsets)))):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            times[name] = (time.perf_counter() - t) / 10
        print(f"expert wgrad into main_grad [512, {n}, {k}], {rows} rows: " + ", ".join(
            f"{name} {v * 1e3:.2f} ms" for name, v in times.items()))


def test_two_packed_rows_in_one_micro_batch_equal_two_micro_batches_on_gpu(world):
    """train.micro_batch_size=2 with packed data on the GPU paths (fla's varlen Gated DeltaNet and short
    convolution, varlen attention, the sorted dispatcher): two packed rows as one thd row give the per-token
    losses and gradients of the rows run one at a time. Without the MoE load-balancing loss, which is a
    function of each micro-batch's routing (the CPU test covers the attention-only model in float32)."""
    from qnext.megatron.data import forward_step, megatron_batch

    g = torch.Generator().manual_seed(5)
    rows = []
    for lens in ((100, 156), (60, 130)):  # the second row ends in padding (a segment of its own)
        ids = torch.randint(0, 151936, (sum(lens),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "position_ids": [i for n in lens for i in range(n)],
                     "seq_lens": list(lens)})
    model = _tiny_model(torch.bfloat16, moe_aux_loss_coeff=0.0)
    model.train()

    def run(batches):
        model.zero_grad(set_to_none=True)
        losses = []
        for b in batches:
            b = {k: v.cuda() if isinstance(v, torch.Tensor) and not k.endswith("_host") else v for k, v in b.items()}
            output, loss_fn = forward_step(iter([b]), model)
            loss, _, _ = loss_fn(output)
            loss.backward()
            losses.append(output.detach().float().reshape(-1))
        return torch.cat(losses), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    l2, g2 = run([megatron_batch(rows, 0, 256, pack=True)])
    l1, g1 = run([megatron_batch([r], 0, 256, pack=True) for r in rows])
    errs = {"loss": rel(l2, l1)}
    errs.update({n: rel(g2[n], g1[n]) for n in g1 if not n.endswith(("A_log", "dt_bias"))})  # bf16 cancellation
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:6]
    print(f"two rows in one micro-batch vs two micro-batches, worst rel L2: {worst}")
    assert g2.keys() == g1.keys() and errs["loss"] < 1e-2
    assert max(errs.values()) < 3e-2, worst


def test_moe_regather_frees_the_experts_input_on_gpu(world, monkeypatch):
    """The MoE block on the GPU path (bf16, sorted dispatcher, torch's grouped GEMM): the experts' gathered input
    (k rows per token) is not kept between forward and backward, the memory held after the forward falls by
    those rows' bytes, and the gradients are the same bits as keeping them (QNEXT_MOE_REGATHER=0)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.dispatch import SortedTokenDispatcher
    from qnext.megatron.spec import _local_moe

    cfg = json.loads(TINY.read_text()) | {"hidden_size": 512, "num_experts": 32, "num_experts_per_tok": 8,
                                          "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256}
    tokens, runs = 2048, {}
    layer = _local_moe()(config=hf_to_transformer_config(cfg, None, torch.bfloat16).config, layer_number=1).cuda()
    assert isinstance(layer.token_dispatcher, SortedTokenDispatcher)
    seen, forward = [], layer.experts.forward

    def spy(rows, *args, **kwargs):
        seen.append(StorageWeakRef(rows.untyped_storage()))
        return forward(rows, *args, **kwargs)

    layer.experts.forward = spy
    for keep in ("0", "1"):  # the same layer and input; the switch is read at each forward
        monkeypatch.setenv("QNEXT_MOE_REGATHER", keep)
        layer.zero_grad(set_to_none=True)
        x = torch.randn(tokens, 1, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        x = x.bfloat16().requires_grad_(True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out, _ = layer(x)
        torch.cuda.synchronize()
        held, alive = torch.cuda.memory_allocated() - before, not seen[-1].expired()
        out.backward(torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out).bfloat16())
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        runs[keep] = (alive, held, out.detach(), x.grad, grads)
    rows_bytes = tokens * 8 * 512 * 2
    print(f"held after the forward: {runs['0'][1] / 2**20:.1f} MiB keeping the rows, {runs['1'][1] / 2**20:.1f} MiB "
          f"gathering them again (rows {rows_bytes / 2**20:.1f} MiB)")
    assert runs["0"][0] and not runs["1"][0]
    assert runs["0"][1] - runs["1"][1] >= rows_bytes
    assert torch.equal(runs["1"][2], runs["0"][2]) and torch.equal(runs["1"][3], runs["0"][3])
    for name, g in runs["0"][4].items():
        assert torch.equal(runs["1"][4][name], g), name
