"""Process groups for scripts and tests that do not go through ``megatron.training``.

``initialize_parallel`` starts torch.distributed from torchrun's environment (or as a world of one
when there is none), then megatron's model-parallel groups and, on GPUs, its RNG trackers.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import torch

from .config import ParallelSizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(parallel: Any = None, *, seed: int = 1234, backend: str | None = None) -> ParallelSizes:
    """torch.distributed (nccl on GPUs, gloo on CPU) + megatron model-parallel groups."""
    from megatron.core import parallel_state as ps

    p = ParallelSizes.of(parallel)
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # a plain `python script.py`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    world = torch.distributed.get_world_size()
    model_parallel = p.tp * p.pp * p.cp
    if world % model_parallel or world % (p.ep * p.etp * p.pp):
        raise ValueError(f"world size {world} does not fit tp={p.tp} pp={p.pp} cp={p.cp} ep={p.ep} etp={p.etp}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            context_parallel_size=p.cp,
            expert_model_parallel_size=p.ep,
            expert_tensor_parallel_size=p.etp,
        )
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return p


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


CPU_BUILD_OVERRIDES = dict(
    use_cpu_initialization=True, perform_initialization=False, moe_token_dispatcher_type="allgather"
)
