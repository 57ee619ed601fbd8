"""megatron.training's ``train_step`` agrees on the step's outcome across the model-parallel group after
the optimizer step: ``logical_and_across_model_parallel_group`` (was the update applied on every rank?) and
``reduce_max_stat_across_model_parallel_group`` (the gradient norm, which ranks without trainable
parameters lack). Each builds a one-element CUDA tensor from a host value, all-reduces it and reads it
back with ``.item()``: three waits for the GPU per step (``tests/gpu/test_megatron_train_gpu.py`` lists
them under ``QNEXT_SYNC_CHECK``). In a group of one rank the all-reduce is the identity, so the wrapper
returns what megatron would, without the device: ``logical_and`` gives ``bool(value)``, ``reduce_max``
gives ``None`` for ``None`` (and for megatron's sentinel -1.0) and otherwise the value rounded to float32,
as megatron's float32 tensor rounds it. Larger groups keep
megatron's reduction, which ``qnext.syncs.PLANNED`` names (after the optimizer step, once per step)."""
from __future__ import annotations

import functools
import struct

from ._patching import install

_MODULE = "megatron.training.training"  # train_step calls the names it imported


def _group_size(group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_model_parallel_group()
    return dist.get_world_size(group)


def _logical_and(original):
    @functools.wraps(original)
    def fixed(input, group=None):
        if _group_size(group) == 1:
            return bool(input)
        return original(input, group=group)

    return fixed


def _reduce_max(original):
    @functools.wraps(original)
    def fixed(stat, group=None):
        if _group_size(group) == 1:
            if stat is None or stat == -1.0:
                return None
            return struct.unpack("f", struct.pack("f", stat))[0]  # float32, as megatron's tensor holds it
        return original(stat, group=group)

    return fixed


def install_step_reductions_fix() -> bool:
    """Wrap both names in ``megatron.training.training``; idempotent. True when both are in place."""
    a = install(_MODULE, "logical_and_across_model_parallel_group", _logical_and)
    b = install(_MODULE, "reduce_max_stat_across_model_parallel_group", _reduce_max)
    return a and b
