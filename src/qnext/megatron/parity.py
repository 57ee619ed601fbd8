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
def megatron_logits(model, tokens: torch.Tensor, device: str = "cuda") -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] (float32) on the last pipeline stage, None elsewhere.

    One micro-batch through every pipeline stage: a stage after the first receives the previous
    stage's hidden states ([s, b, h]) with a point-to-point recv, a stage before the last sends
    its own on. The same code runs on GPUs (NCCL) and on CPU (gloo); megatron's schedules
    allocate on CUDA unconditionally, so they are not used here.
    """
    from megatron.core import parallel_state as ps

    tokens = tokens.to(device)
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    model.eval()
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    if not first:
        cfg = model.config
        hidden = torch.empty(s, b, cfg.hidden_size, dtype=cfg.params_dtype, device=device)
        torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, position_ids, None, runtime_gather_output=True)
    if not last:
        torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out.float().contiguous()  # GPTModel returns [b, s, V] when there are no labels


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
