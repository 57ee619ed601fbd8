"""Logits of the Megatron model on fixed tokens (any TP/EP/PP layout) and error metrics against a
reference, for the HF <-> Megatron parity checks."""
from __future__ import annotations

from typing import Any

import torch


def fixed_tokens(batch: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """The same token ids on every rank and every run (CPU generator, then moved)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] (float32) on the last pipeline stage, None elsewhere.

    Runs megatron's forward-only schedule, so it works for every pipeline size.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = tokens.cuda()
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        out = m(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
        return out, None  # loss_func=None: the schedule collects the output itself

    model.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([{"tokens": tokens, "position_ids": position_ids}]),
        model=[model],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0].float().contiguous()  # GPTModel returns [b, s, V] when there are no labels


def compare(actual: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Relative errors of ``actual`` against ``reference`` (both [b, s, V]) and top-1 agreement."""
    a = actual.double()
    r = reference.double().to(a.device)
    diff = (a - r).abs()
    return {
        "rel_l2": float((a - r).norm() / r.norm()),
        "max_rel": float(diff.max() / r.abs().max()),
        "mean_rel": float(diff.mean() / r.abs().mean()),
        "max_abs": float(diff.max()),
        "top1_agree": float((a.argmax(-1) == r.argmax(-1)).double().mean()),
        "finite": bool(torch.isfinite(a).all()),
    }
