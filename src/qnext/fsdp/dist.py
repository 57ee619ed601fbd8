"""Process group set-up for the FSDP backend: torchrun's environment when present, else one process.

NCCL on GPUs, gloo on CPU. A single process without torchrun still gets a (1-rank) process group, so
the training code has one path: FSDP2 on one rank is a plain model with DTensor parameters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str) -> torch.device:
    """``parallel.device``: auto = CUDA when available, else CPU."""
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("parallel.device=cuda but no CUDA GPU is visible", hint="use parallel.device=cpu (or auto)")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_pref: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Join torchrun's group (env://) or make a 1-rank group in this process."""
    device = pick_device(device_pref)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_min)
        if "MASTER_ADDR" in os.environ and world > 1:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        elif world > 1:
            raise UserError(f"WORLD_SIZE={world} but no MASTER_ADDR", hint="launch with torchrun (scripts/run-fsdp.sh)")
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few float64 scalars over all ranks (exact for the integer counts used here)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
