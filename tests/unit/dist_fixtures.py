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


def ddp_mlp(params_dtype: torch.dtype, **config):
    """A two-linear MLP of megatron's own parallel linears (32 -> 48 -> 32, seed 0) wrapped in megatron's DDP with
    fp32 ``main_grad`` buffers, built for the CPU: (module, ddp). ``config``: TransformerConfig fields (e.g.
    ``gradient_accumulation_fusion=True``). Needs megatron's parallel state (``initialize_parallel``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from qnext.megatron.compat.cpu import cpu_training

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=1, use_cpu_initialization=True,
                            params_dtype=params_dtype, **config)

    class Mlp(MegatronModule):
        def __init__(self):
            super().__init__(cfg)
            self.up = ColumnParallelLinear(32, 48, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                           gather_output=False)
            self.down = RowParallelLinear(48, 32, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                          input_is_parallel=True, skip_bias_add=True)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.up(x)[0]))[0]

    torch.manual_seed(0)
    with cpu_training():
        model = Mlp()
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                         use_distributed_optimizer=False), model)
    return model, ddp
