"""Deterministic data order: which samples each rank sees at each step, from the seed alone.

The training stream is the concatenation of per-epoch permutations of the training set (epoch ``e``
shuffled with ``seed + e``). Step ``s`` consumes stream positions ``[s*G, (s+1)*G)`` with
``G = micro * accum * world``; rank ``r`` takes the ``r``-th contiguous slice of ``micro * accum``
and cuts it into ``accum`` micro-batches. So a 1-process run with accumulation 2 and a 2-process run
with accumulation 1 see the same micro-batches at each step, and the data position of a run is just
its step count (resume needs nothing else).
"""
from __future__ import annotations

from functools import lru_cache

import torch


class GlobalBatchSampler:
    def __init__(self, num_samples: int, micro_batch: int, accum: int, world_size: int, rank: int, seed: int,
                 shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("empty training set")
        self.n = num_samples
        self.micro = micro_batch
        self.accum = accum
        self.world = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _at(self, pos: int) -> int:
        return self._perm(pos // self.n)[pos % self.n]

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        return [self._at(p) for p in range(start, start + self.global_batch)]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for 0-based ``step``."""
        per_rank = self.micro * self.accum
        start = step * self.global_batch + self.rank * per_rank
        mine = [self._at(p) for p in range(start, start + per_rank)]
        return [mine[i * self.micro:(i + 1) * self.micro] for i in range(self.accum)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n
