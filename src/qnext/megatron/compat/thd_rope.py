"""RoPE of packed (``thd``) sequences in one pass instead of one per sequence (no upstream issue;
megatron-core 0.19.2 loops over the sequences of a pack when Transformer Engine is absent)."""
from __future__ import annotations

import functools

from ._patching import install


def _thd_rope_vectorized(original):
    """megatron's ``_apply_rotary_pos_emb_thd`` without its loop over the packed sequences, where it can.

    Without Transformer Engine megatron applies RoPE to a packed (``thd``) batch one sequence at a time
    (``torch.split`` by ``cu_seqlens``, then a slice, a rotation and a copy per sequence), which for
    a 4096-token pack of short chats is hundreds of small kernels per attention layer and pass. The
    same rotation for the whole pack at once: each token's position within its own sequence
    (``arange(T) - start of its sequence``) selects its row of ``freqs``, and megatron's ``bshd`` rotation
    runs once. Element for element the arithmetic is megatron's, so the result is bit-equal
    (``tests/unit/test_megatron_model.py``). Context parallelism and per-token ("packed") frequency tables
    keep megatron's own code."""
    from megatron.core.models.common.embeddings import rope_utils

    @functools.wraps(original)
    def rope_thd(t, cu_seqlens, freqs, rotary_interleaved=False, mla_rotary_interleaved=False, mscale=1.0,
                 cp_group=None, multi_latent_attention=None):
        import torch

        total = t.shape[0]
        plain = (cp_group is not None and cp_group.size() == 1 and multi_latent_attention is None
                 and not (freqs.dim() >= 1 and freqs.size(0) == total))
        if not plain:
            return original(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                            mla_rotary_interleaved=mla_rotary_interleaved, mscale=mscale, cp_group=cp_group,
                            multi_latent_attention=multi_latent_attention)
        cu = cu_seqlens.to(device=t.device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
        positions = torch.arange(total, device=t.device) - starts
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs[positions], rotary_interleaved=rotary_interleaved,
            mla_rotary_interleaved=mla_rotary_interleaved, mscale=mscale).squeeze(1)

    return rope_thd


def install_thd_rope_vectorized() -> bool:
    """Replace megatron's per-sequence ``thd`` RoPE loop by ``_thd_rope_vectorized``; idempotent."""
    return install("megatron.core.models.common.embeddings.rope_utils", "_apply_rotary_pos_emb_thd",
                    _thd_rope_vectorized)
