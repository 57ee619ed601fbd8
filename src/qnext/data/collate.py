"""Samples -> a padded batch of tensors.

Keys: ``input_ids`` (padded with ``pad_id``), ``labels`` (-100 on padding), ``attention_mask``
(1 on real tokens), ``position_ids`` (per chat from 0; the padding tail counts 0, 1, ... as its own
segment), ``cu_seqlens`` (int32 boundaries of every segment in the flattened ``[B*L]`` token stream:
each packed chat, then each row's padding tail, so the last entry is ``B*L``) and ``max_seqlen``
(longest segment). Pick the keys your model call needs; do not splat the whole dict into it.

Keeping chats apart: HF attention separates packed chats only when it gets ``position_ids`` and no
``attention_mask``; varlen kernels (flash-attn, fla's GDN) take ``cu_seqlens``. Unpacked batches need
neither: each row is one chat and ``attention_mask`` marks the padding.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .dataset import IGNORE_INDEX


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def collate(samples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    if not samples:
        raise ValueError("collate() needs at least one sample")
    rows = [{k: _as_list(s[k]) for k in ("input_ids", "labels", "position_ids")} for s in samples]
    seq_lens = [_as_list(s["seq_lens"]) if "seq_lens" in s else [len(r["input_ids"])] for s, r in zip(samples, rows)]
    length = max(len(r["input_ids"]) for r in rows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    b = len(rows)
    input_ids = torch.full((b, length), int(pad_id), dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    bounds = [0]
    for i, (r, lens) in enumerate(zip(rows, seq_lens)):
        n = len(r["input_ids"])
        if not (len(r["labels"]) == len(r["position_ids"]) == n == sum(lens)):
            raise ValueError(f"sample {i}: input_ids/labels/position_ids/seq_lens lengths disagree")
        input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
        position_ids[i, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
        position_ids[i, n:] = torch.arange(length - n)
        start = i * length
        for seg in lens:
            start += seg
            bounds.append(start)
        if n < length:
            bounds.append((i + 1) * length)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "cu_seqlens": cu,
        "max_seqlen": torch.tensor(int((cu[1:] - cu[:-1]).max())),
    }
