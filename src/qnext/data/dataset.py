"""Chats -> training samples: deterministic train/valid split, over-long handling, optional packing.

A sample is a dict of equal-length int lists ``input_ids``, ``labels`` (the token id where the loss
applies, -100 elsewhere; NOT shifted -- the model shifts), ``position_ids`` (0.. per packed chat) plus
``seq_lens`` (the length of each packed chat, summing to the sample length) so attention and the
Gated DeltaNet recurrence can be kept inside each chat (``cu_seqlens`` = cumsum of ``seq_lens``).

Split: a chat goes to valid when ``sha256(seed, chat)`` maps below ``valid_fraction``, so the
decision for a chat never changes when lines are added, removed or reordered, and duplicates of a
chat always land on the same side. Packing is best-fit decreasing: deterministic and dense.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from .chat import encode_chat
from .jsonl import read_chat_jsonl

IGNORE_INDEX = -100
OVERLONG_MODES = ("truncate", "drop")

Sample = dict  # {"input_ids": [...], "labels": [...], "position_ids": [...], "seq_lens": [...]}


@dataclass
class SplitStats:
    chats: int = 0  # chats kept in this split
    sequences: int = 0  # samples after packing (== chats without packing)
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0  # over-long chats cut to seq_length (kept)
    dropped: int = 0  # over-long chats removed (overlong=drop, or nothing left to learn after the cut)
    fill: float = 0.0  # tokens / (sequences * seq_length): how full the sequences are


@dataclass
class DataStats:
    seq_length: int
    packed: bool
    overlong_mode: str
    chats_read: int = 0
    overlong: int = 0  # chats longer than seq_length (before truncating/dropping), both splits
    train: SplitStats = field(default_factory=SplitStats)
    valid: SplitStats = field(default_factory=SplitStats)

    @property
    def truncated(self) -> int:
        return self.train.truncated + self.valid.truncated

    @property
    def dropped(self) -> int:
        return self.train.dropped + self.valid.dropped

    def to_dict(self) -> dict:
        d = asdict(self)
        d["truncated"], d["dropped"] = self.truncated, self.dropped
        return d

    def summary(self) -> str:
        t, v = self.train, self.valid
        text = (f"data: {self.chats_read} chats -> train {t.chats} chats / {t.sequences} sequences / {t.tokens} tokens "
                f"({t.loss_tokens} with loss), valid {v.chats} chats / {v.sequences} sequences / {v.tokens} tokens "
                f"({v.loss_tokens} with loss); seq_length {self.seq_length}, packing {'on' if self.packed else 'off'}")
        if self.packed:
            text += f" (fill {t.fill:.0%})"
        if self.overlong:
            text += (f"; {self.overlong} chats longer than seq_length: {self.truncated} truncated, "
                     f"{self.dropped} dropped (data.overlong={self.overlong_mode})")
        return text


def chat_hash(messages: list[dict], seed: int) -> float:
    """A number in [0, 1) fixed by the chat's content and the seed."""
    key = json.dumps([seed, [[m["role"], m["content"]] for m in messages]], ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_chats(chats: list[list[dict]], valid_fraction: float, seed: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """Deterministic train/valid split by content hash (file order kept within each split).

    When ``valid_fraction > 0`` leaves valid empty (very small files), the chat with the smallest
    hash goes to valid so that held-out loss always has data.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise UserError(f"data.valid_fraction must be in [0, 1), got {valid_fraction}",
                        hint="use e.g. data.valid_fraction=0.05, or 0 with data.valid_path=<file>")
    hashes = [chat_hash(c, seed) for c in chats]
    is_valid = [h < valid_fraction for h in hashes]
    if valid_fraction > 0 and not any(is_valid) and len(chats) > 1:
        is_valid[min(range(len(chats)), key=hashes.__getitem__)] = True
    train = [c for c, v in zip(chats, is_valid) if not v]
    valid = [c for c, v in zip(chats, is_valid) if v]
    if not train:
        raise UserError(f"no training chats left after the split ({len(chats)} chats, valid_fraction {valid_fraction})",
                        hint="lower data.valid_fraction or add data")
    return train, valid


def _one(ids: list[int], mask: list[int]) -> Sample:
    return {
        "input_ids": list(ids),
        "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)],
        "position_ids": list(range(len(ids))),
        "seq_lens": [len(ids)],
    }


def encode_split(chats: list[list[dict]], tokenizer, seq_length: int, overlong: str, stats: SplitStats,
                 counter: DataStats) -> list[Sample]:
    """Encode chats; cut or drop the over-long ones and count them."""
    out = []
    for messages in chats:
        ids, mask = encode_chat(messages, tokenizer)
        if len(ids) > seq_length:
            counter.overlong += 1
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, mask = ids[:seq_length], mask[:seq_length]
            if not any(mask):  # the cut removed every assistant token: nothing to learn
                stats.dropped += 1
                continue
            stats.truncated += 1
        out.append(_one(ids, mask))
    return out


def pack_samples(samples: list[Sample], seq_length: int) -> list[Sample]:
    """Best-fit decreasing: longest first, each into the fullest sequence that still has room.

    Deterministic (ties broken by input order); every input sample appears exactly once, whole.
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in order:
        n = len(samples[i]["input_ids"])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
            bins[b].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            if seq_length - n > 0:
                bisect.insort(free, (seq_length - n, len(bins) - 1))
    packed = []
    for members in bins:
        s: Sample = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in members:
            for key in ("input_ids", "labels", "position_ids", "seq_lens"):
                s[key].extend(samples[i][key])
        packed.append(s)
    return packed


def build_samples(chats: list[list[dict]], tokenizer, seq_length: int, pack: bool, overlong: str,
                  stats: SplitStats, counter: DataStats) -> list[Sample]:
    samples = encode_split(chats, tokenizer, seq_length, overlong, stats, counter)
    stats.chats = len(samples)
    if pack:
        samples = pack_samples(samples, seq_length)
    stats.sequences = len(samples)
    stats.tokens = sum(len(s["input_ids"]) for s in samples)
    stats.loss_tokens = sum(t != IGNORE_INDEX for s in samples for t in s["labels"])
    stats.fill = round(stats.tokens / (stats.sequences * seq_length), 4) if samples else 0.0
    return samples


def build_datasets(path: str | os.PathLike, tokenizer, seq_length: int, pack: bool = False,
                   valid_fraction: float = 0.05, seed: int = 0, overlong: str = "truncate",
                   valid_path: str | os.PathLike | None = None) -> tuple[list[Sample], list[Sample], DataStats]:
    """Read, split, encode, truncate/drop and (optionally) pack a chat JSONL file.

    ``valid_path`` given: all of ``path`` trains and all of ``valid_path`` validates (no split).
    """
    if overlong not in OVERLONG_MODES:
        raise UserError(f"data.overlong must be one of {', '.join(OVERLONG_MODES)}, got {overlong!r}",
                        hint="data.overlong=truncate (cut at seq_length) or data.overlong=drop")
    if int(seq_length) < 2:
        raise UserError(f"data.seq_length must be at least 2, got {seq_length}", hint="e.g. data.seq_length=512")
    stats = DataStats(seq_length=int(seq_length), packed=bool(pack), overlong_mode=overlong)
    chats = read_chat_jsonl(path)
    if valid_path is not None:
        train_chats, valid_chats = chats, read_chat_jsonl(valid_path)
    else:
        train_chats, valid_chats = split_chats(chats, valid_fraction, seed)
    stats.chats_read = len(train_chats) + len(valid_chats)
    train = build_samples(train_chats, tokenizer, stats.seq_length, pack, overlong, stats.train, stats)
    valid = build_samples(valid_chats, tokenizer, stats.seq_length, pack, overlong, stats.valid, stats)
    if not train:
        raise UserError(f"{path}: every training chat was dropped as longer than seq_length {seq_length}",
                        hint="raise data.seq_length or use data.overlong=truncate")
    return train, valid, stats
