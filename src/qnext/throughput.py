"""Model FLOPs of a training step, and MFU against a per-GPU peak table.

FLOPs are counted from the architecture (``models/qwen3_next.py``'s dims), not from the module
tree, so every backend and the planner count the same work:

- every matmul a token passes through, 2 FLOPs per multiply-add: GDN and attention projections,
  the router, the ``top_k`` routed experts and the shared expert (not all experts), the LM head
  (the embedding lookup is free);
- causal softmax attention: Q K^T and P V over the positions before each token, per chat (packed
  chats do not attend to each other), so it grows with the sum of squared chat lengths;
- the Gated DeltaNet recurrence in its chunked form (chunk 64): state read and update
  (4 dk dv per value head) plus the intra-chunk products (2 x 64 (dk + dv)).

A training step is 3 forward passes for full fine-tuning (forward, input gradients, weight
gradients) and 2 for LoRA (frozen weights get no weight gradient; the adapters' own FLOPs are
negligible). Activation recomputation is not counted (the MFU convention). MFU divides by the
GPU's dense bf16 peak from the datasheet; ``QNEXT_PEAK_TFLOPS`` overrides it for GPUs not listed.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional

from .models.qwen3_next import FULL_ATTENTION, Qwen3NextDims

GDN_CHUNK = 64

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets. Matched in
# order against torch.cuda.get_device_name(): the more specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.5),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("GH200", 989.4),
    ("H200", 989.4),  # H200 SXM (141 GB)
    ("H100", 989.4),  # H100 SXM (80 GB HBM3)
    ("H800", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)
PEAK_ENV = "QNEXT_PEAK_TFLOPS"


def peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak of one GPU (``QNEXT_PEAK_TFLOPS`` wins); None when unknown (then no MFU)."""
    env = os.environ.get(PEAK_ENV)
    if env:
        return float(env)
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def forward_flops_per_token(hf_config: Mapping[str, Any]) -> float:
    """Forward FLOPs of one token through the matmuls and the GDN recurrence (no attention scores)."""
    d = Qwen3NextDims.from_hf_config(hf_config)
    topk = int(hf_config.get("num_experts_per_tok") or 0)
    h = d.hidden
    macs = 0.0
    for kind, moe in zip(d.layer_types, d.moe_layers):
        if kind == FULL_ATTENTION:
            # q and its output gate, k, v, then the output projection
            macs += h * (2 * d.num_heads * d.head_dim + 2 * d.num_groups * d.head_dim) + d.num_heads * d.head_dim * h
        else:
            qkvz = 2 * d.nk * d.dk + 2 * d.nv * d.dv
            macs += h * (qkvz + 2 * d.nv) + d.nv * d.dv * h  # in_proj (q, k, v, z, beta, alpha), out_proj
            macs += (2 * d.nk * d.dk + d.nv * d.dv) * d.conv_kernel  # depthwise causal conv
            macs += d.nv * (2 * d.dk * d.dv + GDN_CHUNK * (d.dk + d.dv))  # chunked recurrence
        if moe:
            macs += h * d.num_experts + topk * 3 * h * d.moe_ffn  # router, routed SwiGLU experts
            if d.shared_ffn:
                macs += 3 * h * d.shared_ffn + h  # shared expert and its sigmoid gate
        else:
            macs += 3 * h * d.dense_ffn
    macs += h * d.vocab  # LM head
    return 2.0 * macs


def attention_flops(hf_config: Mapping[str, Any], chat_lengths: Iterable[int]) -> float:
    """Forward FLOPs of causal Q K^T and P V over chats of these lengths (all softmax layers)."""
    d = Qwen3NextDims.from_hf_config(hf_config)
    n_attn = sum(1 for t in d.layer_types if t == FULL_ATTENTION)
    # token i attends to i+1 positions: sum over a chat = L(L+1)/2; two matmuls, 2 FLOPs per MAC
    pairs = sum(n * (n + 1) // 2 for n in chat_lengths)
    return 4.0 * n_attn * d.num_heads * d.head_dim * pairs


def step_flops(hf_config: Mapping[str, Any], chat_lengths: Iterable[int], lora: bool) -> float:
    """Model FLOPs of one training step over chats of these lengths (summed over all ranks)."""
    lengths = list(chat_lengths)
    passes = 2.0 if lora else 3.0
    return passes * (forward_flops_per_token(hf_config) * sum(lengths) + attention_flops(hf_config, lengths))


def mfu(tflops_per_device: float, device_name: Optional[str]) -> Optional[float]:
    """Achieved / peak, or None when the GPU's peak is unknown (CPU, unlisted GPU)."""
    peak = peak_tflops(device_name)
    return None if not peak else tflops_per_device / peak
