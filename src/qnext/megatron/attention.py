"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the TE-free stack.

Drop-in for megatron's ``DotProductAttention`` (same constructor, same forward signature and output
layout) without its explicit [b*np, sq, sk] score matrix: SDPA picks flash / memory-efficient kernels
on the GPU. GQA is handed to SDPA (``enable_gqa``), causal masking is built in, and packed sequences
(``packed_seq_params.qkv_format == 'thd'``) are attended one sample at a time between the
``cu_seqlens`` boundaries, so no token sees another sample.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


MASKED_MAX_TOKENS = 16384  # beyond this the [t, t] mask (and the dense work it masks) outgrow the per-sample loop


def packed_attention_mode() -> str:
    """How packed (``thd``) sequences are attended, from ``QNEXT_PACKED_ATTENTION``: ``varlen`` (the
    default: one flash-attention call over ``cu_seqlens``, CUDA with bf16/fp16 only; elsewhere the loop),
    ``loop`` (one SDPA call per sample, the reference) or ``masked`` (one call per pack with a
    block-diagonal mask). ``masked`` equals the loop on CPU (``tests/unit/test_megatron_model.py``),
    ``varlen`` is checked against it on a GPU (``tests/gpu/test_megatron_model_gpu.py``). Per LoRA step
    of the 4-layer proxy on one H200, varlen took 0.256 s and the loop 0.53 s (2026-12-02; the loop's run
    is ``benchmarks/results/train_throughput_h200_4layer/``, the varlen run's record was not kept)."""
    import os

    from ..errors import UserError

    mode = os.environ.get("QNEXT_PACKED_ATTENTION", "varlen")
    if mode not in ("loop", "masked", "varlen"):
        raise UserError(f"QNEXT_PACKED_ATTENTION={mode!r} is not a packed-attention mode",
                        hint="use varlen (the default), loop or masked, or unset it")
    return mode


def varlen_usable(x: Tensor) -> bool:
    """Whether torch's flash ``varlen_attn`` can take ``x``: CUDA, half precision, torch >= 2.10."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


class SDPAttention(MegatronModule):
    """softmax(q k^T * scale + causal mask) v with SDPA; inputs [sq, b, np, hn] or packed [t, np, hn]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; use TE for cp > 1")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SDPAttention supports softmax_type='vanilla' only")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention does not implement sliding-window attention")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _causal(self, attn_mask_type: Optional[AttnMaskType]) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """q [b, np, s, hn], k/v [b, ng, s, hn] -> [b, np, s, hn]."""
        if mask is not None:
            # Megatron masks are True where attention is NOT allowed; SDPA wants True = keep.
            keep = ~mask.bool()
            if causal:
                sq, sk = q.shape[-2], k.shape[-2]
                keep = keep & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            mask, causal = keep, False
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_heads != self.num_groups,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
        **_unused,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        causal = self._causal(attn_mask_type)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(query, key, value, packed_seq_params, causal)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._sdpa(q, k, v, attention_mask, causal)
        # [b, np, sq, hn] -> [sq, b, np*hn]
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)

    def _forward_packed(self, query: Tensor, key: Tensor, value: Tensor, psp, causal: bool) -> Tensor:
        """query [t, np, hn], key/value [t, ng, hn]; attention only within each sample of cu_seqlens."""
        cu_q = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
        cu_k = psp.cu_seqlens_kv_padded if psp.cu_seqlens_kv_padded is not None else psp.cu_seqlens_kv
        mode = packed_attention_mode()
        if mode == "varlen" and varlen_usable(query) and torch.equal(cu_q, cu_k) and self.dropout_p == 0.0:
            return self._forward_packed_varlen(query, key, value, cu_q, psp.max_seqlen_q, causal)
        if mode == "masked" and query.shape[0] <= MASKED_MAX_TOKENS and torch.equal(cu_q, cu_k):
            return self._forward_packed_masked(query, key, value, cu_q, causal)
        bounds_q = cu_q.tolist()
        bounds_k = cu_k.tolist()
        out = query.new_zeros(query.shape[0], self.num_heads, self.head_dim)
        for i in range(len(bounds_q) - 1):
            q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
            if q1 == q0:
                continue
            q = query[q0:q1].transpose(0, 1).unsqueeze(0)
            k = key[k0:k1].transpose(0, 1).unsqueeze(0)
            v = value[k0:k1].transpose(0, 1).unsqueeze(0)
            out[q0:q1] = self._sdpa(q, k, v, None, causal)[0].transpose(0, 1)
        return out.reshape(query.shape[0], self.num_heads * self.head_dim)

    def _forward_packed_masked(self, query: Tensor, key: Tensor, value: Tensor, cu: Tensor, causal: bool) -> Tensor:
        """The whole pack in one SDPA call with a block-diagonal (and causal) mask: a few kernels per
        layer instead of a handful per sample. Tokens after the last boundary form one more block whose
        output is zero, as in the per-sample loop. K/V heads are repeated for GQA, so that kernels which
        take a mask but not ``enable_gqa`` remain eligible."""
        t = query.shape[0]
        cu = cu.to(device=query.device, dtype=torch.long)
        lengths = torch.cat([cu[1:] - cu[:-1], (t - cu[-1]).reshape(1)])
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=query.device), lengths, output_size=t)
        keep = segment[:, None] == segment[None, :]
        if causal:
            keep = keep & torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
        q = query.transpose(0, 1).unsqueeze(0)
        rep = self.num_heads // self.num_groups
        k, v = (x.repeat_interleave(rep, dim=1) if rep > 1 else x for x in (key, value))
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout_p if self.training else 0.0,
                                             scale=self.softmax_scale)[0].transpose(0, 1)
        out = out * (segment < lengths.numel() - 1).to(out.dtype)[:, None, None]  # the tail block: zeros
        return out.reshape(t, self.num_heads * self.head_dim)

    def _forward_packed_varlen(self, query: Tensor, key: Tensor, value: Tensor, cu: Tensor, max_len, causal: bool) -> Tensor:
        """The whole pack in one flash-attention call over ``cu_seqlens`` (torch's ``varlen_attn``): only the
        samples' own blocks are computed. K/V heads are repeated for GQA: torch 2.11's ``varlen_attn``
        accepts fewer K/V heads in the forward, but its backward then returns wrong dq/dv (measured on an
        H200: rel. L2 0.22 and 1.2 against the per-sample loop; ``benchmarks/results/varlen_attention_h200/``). Tokens after the last boundary are left
        out of the call (the kernel's backward would leave their dq unwritten) and get zeros, as in the
        per-sample loop. The last boundary comes from the host copy of ``cu_seqlens`` that the data
        module attaches (``qnext.megatron.data.attach_host_copy``), so nothing here waits for the device;
        without it, it is read from the device (one sync)."""
        from torch.nn.attention.varlen import varlen_attn

        from .data import host_copy

        t = query.shape[0]
        cu32 = cu.to(device=query.device, dtype=torch.int32)
        host = host_copy(cu)
        end = int(host[-1]) if host is not None else int(cu32[-1])  # the fallback syncs (named here)
        max_len = int(max_len) if max_len else t  # an upper bound is correct, only a little slower
        rep = self.num_heads // self.num_groups
        k, v = (x[:end].repeat_interleave(rep, dim=1) if rep > 1 else x[:end] for x in (key, value))
        out = varlen_attn(query[:end], k, v, cu32, cu32, max_len, max_len, scale=self.softmax_scale,
                          window_size=(-1, 0) if causal else (-1, -1))
        if end < t:
            out = torch.cat([out, out.new_zeros(t - end, *out.shape[1:])])
        return out.reshape(t, self.num_heads * self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters (DotProductAttention's only one is the learnable softmax offset)
