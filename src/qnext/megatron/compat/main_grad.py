"""megatron's DDP gradient hook with the fp32 ``main_grad`` accumulation in one compiled kernel.

After each micro-batch's backward, megatron-core 0.19.2's ``DistributedDataParallel`` hook adds every
weight's bf16 gradient into its fp32 ``main_grad`` with ``main_grad.add_(grad)``. Mixed dtypes send that
through PyTorch's unrolled (not vectorized) elementwise kernel: in the profiled full step of the 4-layer
proxy (16 sequences, micro-batch 2, 1x H200, 2026-12-04) it took 211 ms of 1,006 ms of GPU time, 577 GB at
2.7 TB/s, most of it the grouped experts' weights, which gradient-accumulation fusion does not cover.

:func:`install_main_grad_add` wraps ``DistributedDataParallel._make_backward_post_hook``: where the hook
would add a bf16 CUDA gradient into an fp32 ``main_grad``, the wrapper adds it with
:func:`accumulate` (``main_grad += grad`` compiled by inductor into one vectorized kernel: the same fp32
sums, bit for bit) and lets megatron's hook run with ``grad_added_to_main_grad`` set for that call only, so
megatron does everything else it does (dropping the gradient, the data-parallel bucket bookkeeping) and
adds nothing twice. Every other case (CPU, other dtypes, gradients under ``MIN_VALUES`` values, a weight
whose gradient a fused linear already wrote, ``zero_out_wgrad``, ``QNEXT_FUSED=0``) is megatron's own hook
unchanged. Installed by ``install_all`` before the model is wrapped (the hooks are made at wrapping time).
"""
from __future__ import annotations

import functools

import torch

from ..fused import compiled, fused_enabled
from ._patching import fixes_enabled

MARK = "qnext_fixed"
DEVICE_TYPES = ("cuda",)  # where the compiled add is taken (the CPU tests add "cpu": inductor compiles C++ there)
# smaller gradients (norms, biases, LoRA adapters) keep the eager add: there the compiled call's guard checks on
# the host (tens of microseconds) would cost more than the kernel saves, in steps that are often host-bound
MIN_VALUES = 1 << 20


def accumulate_reference(main_grad: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``main_grad += grad`` (in place; returns ``main_grad``)."""
    return main_grad.add_(grad)


def accumulate(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    """``main_grad += grad``, compiled where it pays (a CUDA fp32 ``main_grad``, a bf16/fp16 gradient)."""
    if (main_grad.device.type in DEVICE_TYPES and main_grad.dtype == torch.float32
            and grad.dtype in (torch.bfloat16, torch.float16) and fused_enabled()):
        compiled(accumulate_reference)(main_grad, grad)
    else:
        accumulate_reference(main_grad, grad)


def _takes_over(param: torch.nn.Parameter) -> bool:
    grad, main = param.grad, getattr(param, "main_grad", None)
    return (grad is not None and main is not None and grad.device.type in DEVICE_TYPES and grad.numel() >= MIN_VALUES
            and main.dtype == torch.float32
            and grad.dtype in (torch.bfloat16, torch.float16) and not getattr(param, "grad_added_to_main_grad", True)
            and not getattr(param, "zero_out_wgrad", False) and fused_enabled())


def _wrap(original):
    @functools.wraps(original)
    def make_hook(self, param):
        hook = original(self, param)

        def fixed(*unused):
            if not (param in self.param_to_bucket_group and _takes_over(param)):
                return hook(*unused)
            accumulate(param.main_grad, param.grad.data)
            param.grad_added_to_main_grad = True  # megatron's hook: skip its add, do the rest
            try:
                return hook(*unused)
            finally:
                param.grad_added_to_main_grad = False

        return fixed

    setattr(make_hook, MARK, True)
    return make_hook


def install_main_grad_add() -> bool:
    """Wrap the hook factory of megatron's DDP (idempotent; ``QNEXT_MEGATRON_FIXES=0`` leaves it alone).
    Returns whether the wrapper is in place."""
    if not fixes_enabled():
        return False
    try:
        from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel
    except ImportError:
        return False
    original = DistributedDataParallel.__dict__.get("_make_backward_post_hook")
    if original is None:
        return False
    if not getattr(original, MARK, False):
        DistributedDataParallel._make_backward_post_hook = _wrap(original)
    return True
