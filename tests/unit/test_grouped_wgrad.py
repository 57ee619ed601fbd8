"""The grouped experts' weight gradient accumulated into DDP's fp32 main_grad (qnext.megatron.grouped_wgrad):
qnext's GroupedGemmExperts in megatron-core's DDP, two micro-batches, with gradient accumulation fusion against
the unfused path (a weight gradient per micro-batch, added by the DDP hook). On CPU the accumulation is the
per-expert fp32 reference; the Triton kernel is compared with it on a GPU (tests/gpu/test_megatron_model_gpu.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

TINY = Path(__file__).resolve().parents[2] / "models/tiny_qwen3_next/config.json"


@pytest.fixture(scope="module")
def world():
    from dist_fixtures import gloo_world_of_one

    gloo_world_of_one()


def _main_grads(fused: bool, marked: bool = False, recompute: str = "none") -> dict[str, torch.Tensor]:
    """``marked``: the rows come gathered from a source as the sorted dispatcher hands them (regathered for the
    backward, qnext.megatron.regather); ``recompute=experts``: the experts run again in the backward."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from qnext.megatron.compat.cpu import cpu_training
    from qnext.megatron.config import hf_to_transformer_config
    from qnext.megatron.experts import GroupedGemmExperts
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES

    cfg = json.loads(TINY.read_text()) | {"hidden_size": 32, "moe_intermediate_size": 16, "num_experts": 6}
    tc = hf_to_transformer_config(cfg, None, torch.float32, **CPU_BUILD_OVERRIDES).config
    tc.perform_initialization = True
    tc.gradient_accumulation_fusion = fused
    tc.qnext_recompute_experts = recompute == "experts"
    torch.manual_seed(0)
    with cpu_training():
        experts = GroupedGemmExperts(6, tc, pg_collection=get_default_pg_collection())
        ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                        use_distributed_optimizer=False), experts)
    assert experts.fuse_wgrad is fused
    ddp.zero_grad_buffer()
    gen = torch.Generator().manual_seed(1)
    with cpu_training():
        for counts in ([3, 0, 5, 1, 0, 7], [2, 4, 0, 0, 6, 1]):  # two micro-batches; experts without tokens
            counts = torch.tensor(counts)
            x = torch.randn(int(counts.sum()), 32, generator=gen)
            if marked:
                from qnext.megatron.regather import mark_gathered

                src, index = x[:9].clone(), torch.randint(0, 9, (x.shape[0],), generator=gen)
                x = mark_gathered(src.index_select(0, index), src, index, lambda s, i=index: s.index_select(0, i))
            out, _ = ddp(x, counts, torch.rand(x.shape[0], generator=gen))
            (out.float() ** 2).sum().backward()
    for p in experts.parameters():
        assert p.grad is None  # the hook dropped whatever autograd handed it
    return {n: p.main_grad.detach().clone() for n, p in experts.named_parameters()}


def test_fused_expert_wgrad_equals_the_unfused_path(world, monkeypatch):
    import qnext.megatron.grouped_wgrad as gw

    calls: list = []
    original = gw.wgrad_accum
    monkeypatch.setattr(gw, "wgrad_accum", lambda *a: calls.append(tuple(a[4].shape)) or original(*a))
    plain = _main_grads(False)
    assert not calls
    fused = _main_grads(True)
    assert calls == [(6, 32, 16), (6, 32, 32)] * 2  # fc2 then fc1 (backward order), each micro-batch
    for name, g in plain.items():
        assert float(g.norm()) > 0
        rel = float((fused[name] - g).norm() / g.norm())
        assert rel < 1e-6, (name, rel)


@pytest.mark.parametrize("recompute", ["none", "experts"])
def test_fused_expert_wgrad_with_regathered_rows(world, recompute):
    """The fused accumulation behind autograd's saved-tensor hooks (the regathered input, the experts' recompute):
    the weight reaches the backward as a plain tensor there, so the Function must not read DDP's main_grad from it."""
    plain = _main_grads(False, marked=True, recompute=recompute)
    fused = _main_grads(True, marked=True, recompute=recompute)
    unmarked = _main_grads(True, marked=False)
    for name, g in plain.items():
        assert float(g.norm()) > 0 and not torch.equal(g, unmarked[name])  # the marked rows are other rows
        rel = float((fused[name] - g).norm() / g.norm())
        assert rel < 1e-6, (name, rel)


def test_reference_accumulates_each_experts_product():
    from qnext.megatron.grouped_wgrad import wgrad_accum, wgrad_accum_reference

    gen = torch.Generator().manual_seed(2)
    counts = [4, 0, 3]
    x, dy = torch.randn(7, 8, generator=gen).bfloat16(), torch.randn(7, 5, generator=gen).bfloat16()
    start = torch.randn(3, 5, 8, generator=gen)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    for fn, c, o in ((wgrad_accum_reference, counts, None), (wgrad_accum_reference, None, offsets),
                     (wgrad_accum, None, offsets)):  # a CPU tensor: wgrad_accum takes the reference
        acc = start.clone()
        fn(x, dy, c, o, acc)
        want = start.clone()
        want[0] += dy[:4].float().t() @ x[:4].float()
        want[2] += dy[4:].float().t() @ x[4:].float()
        assert torch.allclose(acc, want, rtol=1e-6, atol=1e-5)
        assert torch.equal(acc[1], start[1])  # no tokens: untouched


def test_kernel_benchmark_refuses_a_machine_without_a_gpu(tmp_path):
    """benchmarks/grouped_wgrad.py times the Triton kernel: without CUDA it says so in one message (no traceback)."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark runs")
    r = subprocess.run([sys.executable, str(TINY.parents[2] / "benchmarks/grouped_wgrad.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr
