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

from .compat.cpu import construction_device, use_torch_gdn_path  # noqa: F401  (where scripts and tests look)
from .config import ParallelSizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(parallel: Any = None, *, seed: int = 1234, backend: str | None = None) -> ParallelSizes:
    """torch.distributed (nccl on GPUs, gloo on CPU) + megatron model-parallel groups, with
    ``qnext.megatron.compat``'s replacements installed (this is the entry of scripts and tests)."""
    from megatron.core import parallel_state as ps

    from .compat import install_all

    install_all()
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


CPU_BUILD_OVERRIDES = dict(
    use_cpu_initialization=True, perform_initialization=False, moe_token_dispatcher_type="allgather"
)
