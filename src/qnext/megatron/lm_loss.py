"""The language-model loss through fla's fused cross-entropy kernel where it applies.

megatron-core's TE-free losses over Qwen3-Next's 151,936-token vocabulary take several passes over the
[tokens, vocab] logits in float32: its ``native`` fused form (max, exp-sum, a float32 copy, the target
gather, and in backward the softmax rebuilt and scaled) spent 14.8 ms of the 4-layer proxy's 120 ms LoRA
step on an H200 (profile of 2026-12-04), its unfused form more. fla (a pinned dependency) ships a Triton
cross-entropy that reads the bf16 logits once forward (log-sum-exp and the target logit, float32 inside)
and once backward (softmax minus one-hot, written in the logits' dtype, over the logits themselves): the
same function, fewer bytes.

:class:`QnextGPTModel` is megatron's ``GPTModel`` with ``compute_language_model_loss`` taking fla's kernel
when :func:`fla_loss_applies` (CUDA logits, the vocabulary on one tensor-parallel rank; ``QNEXT_FLA_LOSS=0``
turns it off);
otherwise megatron's own. ``tests/unit/test_lm_loss.py`` compares the two (values and gradients) on the
CPU through Triton's interpreter.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from .switches import switch_on

ENV = "QNEXT_FLA_LOSS"


def fla_loss_applies(logits: torch.Tensor, tp_size: int) -> bool:
    """On by default (``QNEXT_FLA_LOSS=0``: megatron's loss) for CUDA logits with the whole vocabulary on
    this rank. Checked in GPU training steps on an H200 (2026-12-04): the proxy's losses at steps 1 and 2
    (after one update) equal those with megatron's native fused loss to the printed 4 decimals."""
    return logits.is_cuda and tp_size == 1 and switch_on(ENV, True)


def fla_lm_loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """labels [b, s] (token ids), logits [s, b, V] (the whole vocabulary) -> per-token loss [b, s], float32:
    what megatron's ``compute_language_model_loss`` returns."""
    from fla.modules.fused_cross_entropy import cross_entropy_loss

    s, b, vocab = logits.shape
    # inplace_backward: the logit gradient is written over the logits, which nothing else reads after the loss
    # (the output layer's backward needs its input and weight): one [tokens, vocab] tensor fewer in backward
    # (2.5 GB at 8,192 tokens of Qwen3-Next's vocabulary, bf16)
    loss, _ = cross_entropy_loss(logits.reshape(s * b, vocab), labels.transpose(0, 1).reshape(s * b),
                                 inplace_backward=True)
    return loss.view(s, b).transpose(0, 1).contiguous()


class QnextGPTModel(GPTModel):
    """megatron's ``GPTModel``; its loss through :func:`fla_lm_loss` where :func:`fla_loss_applies`."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if fla_loss_applies(logits, self.pg_collection.tp.size()):
            return fla_lm_loss(labels, logits)
        return super().compute_language_model_loss(labels, logits)
