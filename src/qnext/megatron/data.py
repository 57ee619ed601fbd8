"""The chat data module (``qnext.data``) wired into megatron-core's training step.

- ``megatron_batch``: samples -> one micro-batch in Megatron's convention. Rows are padded to exactly
  ``seq_length`` (pipeline stages exchange fixed-shape activations). Megatron's loss at position t
  scores the prediction of token t+1, so ``labels``/``loss_mask`` are our unshifted labels moved one
  left: ``loss_mask[t] = 1`` exactly where ``labels[t+1]`` is labelled (an assistant token) and t+1
  is not the first token of another packed chat. Packed rows (``data.pack``) go as Megatron's ``thd``
  format: ``cu_seqlens`` keeps attention, the Gated DeltaNet state and RoPE positions inside each chat.
  A micro-batch of several packed rows is one ``thd`` row of ``micro_batch_size * seq_length`` tokens
  (the rows one after another, each row's padding tail its own segment): one forward over twice the
  tokens instead of two, which halves the kernel launches and Python work per token of a step whose
  host, not its GPU, sets the pace (``packed_shape``).
- ``MicroBatches``: the deterministic global-batch order of ``qnext.fsdp.sampler`` (the same data
  order for any number of data-parallel ranks; the position is the step count, so resuming needs
  nothing else), cut into this data-parallel rank's micro-batches.
- ``forward_step`` / ``loss_func``: the pair ``forward_backward_func`` calls. The loss is a sum over
  labelled tokens returned with their count; with ``--calculate-per-token-loss`` the gradients are
  divided by the labelled-token count of the whole global batch (folded into the backward's seed by
  ``qnext.megatron.token_scale``), so the step optimises the mean cross-entropy over every labelled token
  (token-weighted), as the FSDP backend does.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional, Sequence

import torch

from ..data.collate import collate
from ..data.dataset import IGNORE_INDEX
from ..fsdp.sampler import GlobalBatchSampler


def megatron_batch(samples: Sequence[dict], pad_id: int, seq_length: int, pack: bool) -> dict[str, Any]:
    """One micro-batch (CPU tensors). Keys: tokens, labels, loss_mask, position_ids, padding_mask,
    chat_lengths (list of the real chats' lengths), and for packed rows cu_seqlens + max_seqlen."""
    longest = max(len(s["input_ids"]) for s in samples)
    if longest > seq_length:
        raise ValueError(f"a sample has {longest} tokens, more than seq_length={seq_length}")
    b = collate(samples, pad_id, pad_to_multiple_of=seq_length)
    ids, labels, positions = b["input_ids"], b["labels"], b["position_ids"]
    target = torch.full_like(ids, int(pad_id))
    target[:, :-1] = ids[:, 1:]
    loss_mask = torch.zeros(ids.shape, dtype=torch.float32)
    loss_mask[:, :-1] = ((labels[:, 1:] != IGNORE_INDEX) & (positions[:, 1:] != 0)).float()
    out: dict[str, Any] = {
        "tokens": ids,
        "labels": target,
        "loss_mask": loss_mask,
        "position_ids": positions,
        "padding_mask": b["attention_mask"] == 0,
        "chat_lengths": [n for s in samples for n in _as_list(s.get("seq_lens", [len(s["input_ids"])]))],
    }
    if pack:  # rows one after another in one thd row; collate's cu_seqlens already index that stream
        for k in ("tokens", "labels", "loss_mask", "position_ids", "padding_mask"):
            out[k] = out[k].reshape(1, -1)
        out["cu_seqlens"] = b["cu_seqlens"]
        out["cu_seqlens_host"] = b["cu_seqlens"].clone()  # stays on the host: fla's chunk tables without a sync
        out["max_seqlen"] = int(b["max_seqlen"])
    return out


def packed_shape(seq_length: int, micro_batch_size: int, pack: bool) -> tuple[int, int]:
    """(sequence length, rows) of the activations megatron's schedules exchange for one micro-batch: packed
    rows travel as one row of ``micro_batch_size * seq_length`` tokens."""
    return (seq_length * micro_batch_size, 1) if pack else (seq_length, micro_batch_size)


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor to ``device``, except ``*_host`` copies kept for host-side bookkeeping."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and not k.endswith("_host") else v
            for k, v in batch.items()}


@dataclass
class MicroBatches:
    """This data-parallel rank's micro-batches of one step, as the iterator megatron consumes."""

    samples: Sequence[dict]
    sampler: GlobalBatchSampler
    pad_id: int
    seq_length: int
    pack: bool
    device: torch.device

    def step(self, step: int) -> list[dict[str, Any]]:
        """The micro-batches of 0-based ``step`` (CPU tensors)."""
        return [megatron_batch([self.samples[i] for i in ix], self.pad_id, self.seq_length, self.pack)
                for ix in self.sampler.micro_batches(step)]

    def iterator(self, batches: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return (to_device(b, self.device) for b in batches)


def eval_batches(samples: Sequence[dict], micro_batch: int, dp_size: int, dp_rank: int, limit: int) -> list[list[int]]:
    """Held-out micro-batches for this rank: the first ``limit`` global rounds (0 = all), every rank
    the same number (pipeline schedules are collective); short rounds repeat sample 0 with no loss."""
    per_round = micro_batch * dp_size
    rounds = -(-len(samples) // per_round) if samples else 0
    if limit > 0:
        rounds = min(rounds, limit)
    out = []
    for r in range(rounds):
        start = r * per_round + dp_rank * micro_batch
        out.append([i if i < len(samples) else -1 for i in range(start, start + micro_batch)])
    return out


def eval_micro_batch(samples: Sequence[dict], ix: list[int], pad_id: int, seq_length: int, pack: bool) -> dict[str, Any]:
    """Like ``megatron_batch``; index -1 (padding a short last round) contributes no loss."""
    batch = megatron_batch([samples[max(i, 0)] for i in ix], pad_id, seq_length, pack)
    mask = batch["loss_mask"].view(len(ix), seq_length)  # packed rows were concatenated: view them apart again
    for row, i in enumerate(ix):
        if i < 0:
            mask[row] = 0.0
    return batch


_HOST = "_qnext_host_copy"


def attach_host_copy(cu_device: torch.Tensor, cu_host: torch.Tensor) -> torch.Tensor:
    """Remember the host copy of a device ``cu_seqlens`` on the tensor (for fla's ``cu_seqlens_cpu``)."""
    setattr(cu_device, _HOST, cu_host.to(device="cpu", dtype=torch.int64))
    return cu_device


def host_copy(cu: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return getattr(cu, _HOST, None) if cu is not None else None


_CHUNKS = "_qnext_chunk_tables"


def chunk_table(cu_host: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """fla's chunk table of a packed row on the host: one ``(sequence, chunk within it)`` row per
    ``chunk_size``-token chunk of each sequence (what ``fla.ops.utils.prepare_chunk_indices`` builds).

    Plain Python over the row's few dozen chunks: as torch CPU ops inside the training step (the first GDN
    layer of each micro-batch builds it) the ``repeat_interleave`` took 3.8 ms of host time per micro-batch
    on the H200 machine (profile of 2026-12-04), with the GPU idle behind it."""
    bounds = cu_host.tolist()
    rows = [(i, c) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
            for c in range((b - a + chunk_size - 1) // chunk_size)]
    return torch.tensor(rows, dtype=torch.int64).view(-1, 2)


def chunk_indices(cu: Optional[torch.Tensor], chunk_size: int = 64) -> Optional[torch.Tensor]:
    """fla's chunk table for the packed row ``cu`` on ``cu``'s device, built from the host copy and cached on
    ``cu`` (every GDN layer of a micro-batch, forward and backward, shares it). fla builds the same table
    per call from ``cu_seqlens_cpu`` and copies it with a blocking host-to-device copy, which waits for the
    GPU queue to drain; here it is copied once from pinned memory without waiting. None without a host copy."""
    host = host_copy(cu)
    if host is None:
        return None
    cache = cu.__dict__.setdefault(_CHUNKS, {})
    if chunk_size not in cache:
        table = chunk_table(host, chunk_size).to(cu.dtype)
        if cu.is_cuda:
            table = table.pin_memory().to(cu.device, non_blocking=True)
        cache[chunk_size] = table
    return cache[chunk_size]


def packed_seq_params(batch: dict[str, Any]):
    """Megatron's ``thd`` description of a packed row, or None for padded rows."""
    if "cu_seqlens" not in batch:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(torch.int32)
    if "cu_seqlens_host" in batch:
        attach_host_copy(cu, batch["cu_seqlens_host"])
    n = batch["max_seqlen"]
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(sum of the labelled tokens' cross-entropy, their count, report [sum, count] for logging)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).to(losses.dtype)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), mask.sum().detach()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[dict[str, Any]], model):
    """megatron-core's forward step: one micro-batch through this pipeline stage."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,  # causal attention; padding sits at the end of each row and carries no loss
        labels=batch["labels"],
        packed_seq_params=packed_seq_params(batch),
        padding_mask=batch["padding_mask"],
    )
    return output, partial(loss_func, batch["loss_mask"])


def reduce_report(losses: list[dict[str, torch.Tensor]], key: str = "lm loss") -> Optional[torch.Tensor]:
    """Sum the per-micro-batch [sum, count] reports (last pipeline stage only; None elsewhere)."""
    if not losses:
        return None
    return torch.stack([x[key].reshape(-1) for x in losses]).sum(dim=0)
