"""Model FLOPs of a training step, and MFU against a per-GPU peak table.

FLOPs are counted from the architecture (``models/qwen3_next.py``'s dims), not from the module
tree, so every backend and the planner count the same work:

- every matmul a token passes through, 2 FLOPs per multiply-add: GDN and attention projections,
  the router, the ``top_k`` routed experts and the shared expert (not all experts), the LM head
  (the embedding lookup is free);
- causal softmax attention: Q K^T and P V over the positions before each token, per chat (packed
  chats do not attend to each other), so it grows with the sum of squared chat lengths;
- the Gated DeltaNet recurrence in its chunked form (chunk C = 64), per token and value head:
  3 dk dv (state read by q and by the decayed keys, state update) + C (3 dk + 2 dv) (the two C x C
  score matrices, the intra-chunk output, the UT transform applied to k and v), as fla's kernels
  compute it (:func:`gdn_chunk_macs_per_token`); the depthwise causal conv.

``tests/unit/test_flops.py`` checks every term against ``torch.utils.flop_counter`` on transformers'
Qwen3-Next (eager experts and attention, torch GDN path): projections, router, experts, shared
expert and LM head exactly; attention scores as the causal half of the full T x T products; the GDN
chunk products exactly except the UT transform, which the torch reference does as triangular solves.
It also measures forward + backward: 3x the forward matmul FLOPs for full training, 2x for LoRA
(frozen weights get no weight gradient; the first layer's projections not even an input gradient,
so 2x is a slight over-count).

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


def gdn_chunk_macs_per_token(dk: int, dv: int, chunk: int = GDN_CHUNK) -> int:
    """Multiply-adds of the chunked gated delta rule per token and value head, as fla's chunk kernels
    do it: per chunk of C tokens, the two C x C score matrices (k_beta K^T for the UT transform, Q K^T)
    and the intra-chunk output (scores @ v_new): C^2 (2 dk + dv); the UT transform applied to v and
    k as matmuls with its inverted triangle: C^2 (dk + dv); the state read by q and by the decayed keys
    and the state update: 3 C dk dv. Divided by C."""
    return 3 * dk * dv + chunk * (3 * dk + 2 * dv)


def forward_flops_breakdown(hf_config: Mapping[str, Any]) -> dict[str, float]:
    """Forward FLOPs of one token by component, summed over layers (no attention scores):
    ``attention_proj`` (q with its gate, k, v, o), ``gdn_proj`` (in_proj_qkvz, in_proj_ba, out_proj),
    ``gdn_conv`` (depthwise causal conv), ``gdn_recurrence`` (chunked delta rule), ``router``,
    ``experts`` (the ``top_k`` routed SwiGLU experts), ``shared_expert`` (with its sigmoid gate),
    ``dense_mlp`` and ``lm_head``."""
    d = Qwen3NextDims.from_hf_config(hf_config)
    topk = int(hf_config.get("num_experts_per_tok") or 0)
    h = d.hidden
    macs = dict.fromkeys(("attention_proj", "gdn_proj", "gdn_conv", "gdn_recurrence", "router", "experts",
                          "shared_expert", "dense_mlp", "lm_head"), 0.0)
    for kind, moe in zip(d.layer_types, d.moe_layers):
        if kind == FULL_ATTENTION:
            # q and its output gate, k, v, then the output projection
            macs["attention_proj"] += (h * (2 * d.num_heads * d.head_dim + 2 * d.num_groups * d.head_dim)
                                       + d.num_heads * d.head_dim * h)
        else:
            qkvz = 2 * d.nk * d.dk + 2 * d.nv * d.dv
            macs["gdn_proj"] += h * (qkvz + 2 * d.nv) + d.nv * d.dv * h  # in_proj (q, k, v, z, beta, alpha), out_proj
            macs["gdn_conv"] += (2 * d.nk * d.dk + d.nv * d.dv) * d.conv_kernel  # depthwise causal conv
            macs["gdn_recurrence"] += d.nv * gdn_chunk_macs_per_token(d.dk, d.dv)
        if moe:
            macs["router"] += h * d.num_experts
            macs["experts"] += topk * 3 * h * d.moe_ffn  # routed SwiGLU experts
            if d.shared_ffn:
                macs["shared_expert"] += 3 * h * d.shared_ffn + h  # shared expert and its sigmoid gate
        else:
            macs["dense_mlp"] += 3 * h * d.dense_ffn
    macs["lm_head"] = h * d.vocab  # the embedding lookup is free
    return {k: 2.0 * v for k, v in macs.items()}


def forward_flops_per_token(hf_config: Mapping[str, Any]) -> float:
    """Forward FLOPs of one token through the matmuls and the GDN recurrence (no attention scores)."""
    return sum(forward_flops_breakdown(hf_config).values())


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


# Per-GPU NVLink bandwidth, one direction, GB/s (datasheets: NVLink 4 is 900 GB/s per GPU in both
# directions together on H100/H200 SXM; NVLink 5 1800 GB/s on B200). An all-to-all moves data both ways
# at once, so each GPU's send volume meets half the bidirectional figure; NCCL reaches less than that.
NVLINK_GBPS_ONE_WAY = {"H100": 450.0, "H200": 450.0, "B200": 900.0}


def ep_all_to_all_bytes(hf_config: Mapping[str, Any], tokens_per_gpu: int, ep: int, *, moe_passes: int = 2,
                        bytes_per_value: int = 2) -> float:
    """Bytes one GPU sends in the expert-parallel all-to-alls of one training step, with balanced routing.

    Per MoE layer and forward pass each of the ``tokens_per_gpu`` tokens sends ``top_k`` hidden vectors to
    the ranks holding its experts, of which a share ``(ep - 1) / ep`` leaves the GPU (dispatch), and the
    same comes back (combine); the backward pass moves the same again (the gradients of both). So
    ``moe_passes`` x 2 x tokens x top_k x hidden x bytes x (ep - 1) / ep per layer: ``moe_passes`` = 2
    (forward + backward), 3 when the MoE block is recomputed. The routing probabilities (4 bytes per
    token and choice) are left out (under 0.1% of it)."""
    d = Qwen3NextDims.from_hf_config(hf_config)
    topk = int(hf_config.get("num_experts_per_tok") or 0)
    moe_layers = sum(1 for m in d.moe_layers if m)
    per_layer = 2 * tokens_per_gpu * topk * d.hidden * bytes_per_value * (ep - 1) / ep
    return float(moe_passes * per_layer * moe_layers)


def ep_all_to_all_seconds(hf_config: Mapping[str, Any], tokens_per_gpu: int, ep: int, *, gbps_one_way: float = 450.0,
                          moe_passes: int = 2) -> float:
    """:func:`ep_all_to_all_bytes` at ``gbps_one_way`` GB/s per GPU: a lower bound on the all-to-all time
    of a step (achieved NCCL bandwidth is lower; overlap with compute would hide part of it)."""
    return ep_all_to_all_bytes(hf_config, tokens_per_gpu, ep, moe_passes=moe_passes) / (gbps_one_way * 1e9)


def ep_emulation_record(full_hf: Mapping[str, Any], experts: int, tokens_per_gpu: int, *, moe_passes: int = 2,
                        gpu: str = "H200") -> dict[str, Any]:
    """What a one-GPU run with ``experts`` of the full model's routed experts stands for: one rank of the full
    model under EP = E / ``experts`` with balanced routing (each expert receives as many tokens as routing this
    GPU's tokens top-k over its ``experts`` gives it), and the expert-parallel all-to-all it leaves out, as the
    bytes one GPU sends per step and a lower-bound time at ``gpu``'s NVLink one-way bandwidth
    (:func:`ep_all_to_all_seconds`, no overlap with compute). The run-record fields both benchmarks write."""
    ep = int(full_hf["num_experts"]) // experts
    gbps = NVLINK_GBPS_ONE_WAY[gpu]
    return {"emulated_ep": ep,
            "a2a_bytes_per_step": ep_all_to_all_bytes(full_hf, tokens_per_gpu, ep, moe_passes=moe_passes),
            "a2a_estimate_s": ep_all_to_all_seconds(full_hf, tokens_per_gpu, ep, gbps_one_way=gbps, moe_passes=moe_passes),
            "a2a_assumed_gbps_one_way": gbps,
            "emulation_leaves_out": "the EP all-to-all (estimated), NCCL launch latencies, load imbalance between ranks, "
                                    "the data-parallel gradient reduction of the adapters"}
