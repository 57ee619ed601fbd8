"""A torch.distributed world of one process for the CPU tests that run megatron's code in-process."""
from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_world_of_one() -> None:
    """A gloo world of one rank with megatron's parallel state and the CPU Gated DeltaNet path (idempotent)."""
    from qnext.megatron.parallel import initialize_parallel, use_torch_gdn_path

    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    initialize_parallel(None, backend="gloo")
    use_torch_gdn_path()
