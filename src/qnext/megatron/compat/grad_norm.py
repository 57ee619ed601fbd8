"""The gradient norm of megatron-core 0.19.2's optimizer without Transformer Engine or Apex, and its
NaN/Inf check, in one read of the device per step.

1. Without TE or Apex, ``megatron.core.optimizer.clip_grads`` takes the norm with
   ``megatron.core.utils.local_multi_tensor_l2_norm``, which builds a host tensor from the per-gradient
   norms: one device read per gradient tensor (28 for the tiny LoRA run, 55 for full training, hundreds
   for the 80B model), then copies the result back to the GPU. :func:`foreach_l2_norm` takes the same norm
   (the 2-norm of the per-tensor 2-norms) with ``torch._foreach_norm`` on the device, without a read;
   megatron then reads the total once (``get_grad_norm_fp32``, the sync ``qnext.syncs.PLANNED`` names).
   TE's and Apex's kernels are left alone.
2. megatron's DDP checks every gradient bucket for NaN and for Inf before the data-parallel reduction,
   two device reads per bucket per step (``check_grads``). When gradients are clipped
   (``train.grad_clip > 0``) the optimizer reads the global gradient norm on the host anyway, and a NaN or
   Inf anywhere in the gradients makes that norm NaN or Inf. :func:`install_grad_norm_fix` makes such a
   norm fatal before the optimizer applies anything (megatron's bf16 optimizer would otherwise apply
   it: its clip factor compares as False against a NaN), so ``qnext.megatron.args`` turns the DDP check off
   in that case (``--no-check-for-nan-in-loss-and-grad``) and the step keeps the one planned read. The
   error names the step's gradient, not the rank or bucket that produced it (under data parallelism the
   reduction has spread it by then). Without clipping megatron takes no norm, and the DDP check stays on.
"""
from __future__ import annotations

import functools
import math

import torch

from ...errors import UserError
from ._patching import install


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's ``local_multi_tensor_l2_norm`` (same arguments and result: a float32 CUDA tensor of
    shape [1] and None) without reading the device."""
    norms = [torch.stack(torch._foreach_norm(ts)).float() for ts in tensor_lists if len(ts)]
    if not norms:
        return torch.zeros(1, dtype=torch.float, device="cuda"), None
    return torch.linalg.vector_norm(torch.cat(norms)).reshape(1), None


def _l2_norm(original):
    from megatron.core.utils import local_multi_tensor_l2_norm

    @functools.wraps(original)
    def fixed(*args, **kwargs):
        impl = foreach_l2_norm if original is local_multi_tensor_l2_norm else original
        return impl(*args, **kwargs)

    return fixed


class NonFiniteGradients(UserError, RuntimeError):
    """The step's gradients hold NaN or Inf (the entry prints one message and exits 2, as for a bad input)."""


def _finite_norm(original):
    @functools.wraps(original)
    def fixed(*args, **kwargs):
        norm = original(*args, **kwargs)
        if isinstance(norm, float) and not math.isfinite(norm):
            raise NonFiniteGradients(
                f"the gradient norm of this step is {norm}: the gradients hold NaN or Inf, and the optimizer "
                "did not apply them", hint="lower train.lr, check the data for empty or broken samples, or "
                "resume from the last checkpoint")
        return norm

    return fixed


def install_grad_norm_fix() -> bool:
    """Both replacements (idempotent); True when both are in place."""
    a = install("megatron.core.optimizer.clip_grads", "l2_norm_impl", _l2_norm)
    b = install("megatron.core.optimizer.optimizer", "get_grad_norm_fp32", _finite_norm)
    return a and b
