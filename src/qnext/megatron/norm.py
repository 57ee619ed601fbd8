"""RMSNorm for the TE-free stack, zero-centered when the config asks for it.

megatron-core's torch norm wrapper refuses ``layernorm_zero_centered_gamma``; Qwen3-Next needs it
(HF ``Qwen3NextRMSNorm``: y = x_hat * (1 + w), weight initialised to zeros). The arithmetic follows
HF: normalise in float32, scale by (1 + w) in float32, cast back once
(``qnext.megatron.fused.rms_norm``, compiled into one kernel per direction on CUDA). Built by megatron's
``build_module`` like any ``LayerNormBuilder`` (``config=, hidden_size=, eps=``).
"""
from __future__ import annotations

import torch
from torch import nn

from .fused import rms_norm


class RMSNorm(nn.Module):
    """y = x / rms(x) * (1 + w) with ``config.layernorm_zero_centered_gamma``, else * w."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.config = config
        self.eps = float(eps)
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        device = None if getattr(config, "use_cpu_initialization", False) else _default_device()
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = nn.Parameter(init(hidden_size, dtype=config.params_dtype, device=device))
        # Megatron reduces the grads of sequence-parallel norm weights over the TP group.
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centered)  # one compiled kernel on CUDA (qnext.megatron.fused)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered={self.zero_centered}"


def _default_device():
    return torch.cuda.current_device() if torch.cuda.is_available() else None
