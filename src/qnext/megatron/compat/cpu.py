"""Building and running megatron-core modules without a GPU (tests, manifests, the layout check).

megatron-core 0.19.2 allocates Gated DeltaNet's parameters on ``torch.cuda.current_device()`` and
normalises q/k with fla's Triton kernel even on its torch (deterministic) path."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def construction_device(device: str = "cpu"):
    """Build megatron modules without a GPU (tests, manifests): ``device`` is ``cpu`` or ``meta``.

    megatron-core's GDN allocates on ``torch.cuda.current_device()`` unconditionally; inside this
    context that call answers ``device`` and tensors created without a device land there too.
    Combine with ``use_cpu_initialization=True, perform_initialization=False`` and the
    ``allgather`` token dispatcher (the all-to-all one creates a CUDA stream).
    """
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: device  # type: ignore[assignment]
    try:
        with torch.device(device):
            yield
    finally:
        torch.cuda.current_device = original  # type: ignore[assignment]


def _l2norm_torch(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's ``l2norm`` (x / sqrt(sum x^2 + eps) over the last dim, in float32) without Triton."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def use_torch_gdn_path() -> None:
    """Run megatron-core's GDN on CPU: its torch conv1d and chunked rule come with
    ``deterministic_mode=True``; the q/k L2 norm, always fla's Triton kernel, is replaced here by the
    same function in torch. For CPU tests and parity checks only (GPUs keep fla's kernels)."""
    from megatron.core.ssm.gated_delta_net import common

    common.l2norm = _l2norm_torch


class _NoStream:
    """What megatron's gradient sync asks of ``torch.cuda.current_stream()`` on a CPU-only run (it waits
    on events that only CUDA-graph replays set)."""

    def wait_event(self, event) -> None:  # never called without CUDA graphs
        raise RuntimeError("CUDA event on a CPU run")


@contextlib.contextmanager
def cpu_training():
    """Train megatron modules on CPU (gloo): no CUDA stream for the gradient sync to wait on, no CUDA
    RNG fork (dropout is 0), modules built on the CPU."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    current_stream = torch.cuda.current_stream
    torch.cuda.current_stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]
    # the model-parallel CUDA RNG (forked around dropout, which is 0 here) has no CPU counterpart
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    try:
        with construction_device("cpu"):
            yield
    finally:
        torch.cuda.current_stream = current_stream  # type: ignore[assignment]
        del tracker.fork
