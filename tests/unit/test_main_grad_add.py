"""DDP's main_grad accumulation through one compiled kernel (qnext.megatron.compat.main_grad): megatron-core's
own linears and DDP, bf16 weights with fp32 main_grad, two micro-batches, with the wrapped hook against
megatron's hook. The compiled add is CUDA-only in training; here the CPU is let in (inductor compiles C++),
so the wrapper, the compiled kernel and megatron's bookkeeping all run."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def world():
    from qnext.megatron.parallel import initialize_parallel

    initialize_parallel()
    yield


def _main_grads(wrapped: bool, monkeypatch, calls: list) -> dict[str, torch.Tensor]:
    from dist_fixtures import ddp_mlp
    from megatron.core.distributed import DistributedDataParallel

    from qnext.megatron.compat import main_grad
    from qnext.megatron.compat.cpu import cpu_training

    original = DistributedDataParallel.__dict__["_make_backward_post_hook"]
    original = getattr(original, "__wrapped__", original)  # megatron's own, whatever install_all did before
    monkeypatch.setattr(DistributedDataParallel, "_make_backward_post_hook", original)
    if wrapped:
        assert main_grad.install_main_grad_add()
        assert getattr(DistributedDataParallel._make_backward_post_hook, main_grad.MARK, False)
        monkeypatch.setattr(main_grad, "DEVICE_TYPES", ("cuda", "cpu"))
        monkeypatch.setattr(main_grad, "MIN_VALUES", 48 * 32)  # both weights here (1,536 values) count as large
        real = main_grad.accumulate
        monkeypatch.setattr(main_grad, "accumulate", lambda m, g: calls.append(tuple(m.shape)) or real(m, g))
    model, ddp = ddp_mlp(torch.bfloat16, bf16=True)
    ddp.zero_grad_buffer()
    gen = torch.Generator().manual_seed(1)
    with cpu_training():
        for _ in range(3):  # three micro-batches accumulate into main_grad
            x = torch.randn(16, 2, 32, generator=gen).bfloat16()
            (ddp(x).float() ** 2).sum().backward()
    for p in model.parameters():
        assert p.grad is None and p.grad_added_to_main_grad is False  # megatron's hook dropped it, flag restored
    return {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}


def test_compiled_main_grad_add_equals_megatrons_hook(world, monkeypatch):
    calls: list = []
    plain = _main_grads(False, monkeypatch, calls)
    assert not calls
    fast = _main_grads(True, monkeypatch, calls)
    assert sorted(calls) == sorted([(48, 32), (32, 48)] * 3)  # each weight, each micro-batch, once
    for name, g in plain.items():
        assert g.dtype == torch.float32 and float(g.norm()) > 0
        assert torch.equal(fast[name], g), name  # the same fp32 sums, bit for bit


def test_compiled_add_writes_into_a_view_of_the_buffer():
    """main_grad is a view into DDP's flat grad buffer: the compiled add must write there, in place."""
    from qnext.megatron.compat.main_grad import accumulate_reference
    from qnext.megatron.fused import compiled

    gen = torch.Generator().manual_seed(2)
    buf = torch.randn(1000, generator=gen)
    view = buf[136:136 + 24 * 20].view(24, 20)
    grad = torch.randn(24, 20, generator=gen).bfloat16()
    want = buf.clone()
    want[136:136 + 480] += grad.float().reshape(-1)
    compiled(accumulate_reference)(view, grad)
    assert torch.equal(buf, want)
