"""Samplers that make distributed training and gradient accumulation interchangeable.

Training: one seeded permutation per epoch, cut into blocks of ``batch_size``. On update ``u``, rank ``r``
and accumulation micro-step ``a`` read block ``u * W * A + r * A + a``. So W ranks with accumulation A see
exactly the same micro-batches (and, with ``micro_index``, the same random streams) as one process with
accumulation W * A: a 2-process run can be checked against a 1-process run to float precision.

Evaluation: rank ``r`` takes indices ``r, r + W, ...`` with no padding, so gathered predictions contain
every sample exactly once.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class BlockShardSampler(Sampler[int]):
    """Seeded, epoch-dependent training order sharded in contiguous batch blocks (drop-last semantics)."""

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, accum_iter: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world_size, rank
        self.accum, self.seed, self.shuffle, self.epoch, self.start = accum_iter, seed, shuffle, 0, 0
        per_update = batch_size * world_size * accum_iter
        self.updates = n // per_update
        if self.updates == 0:
            raise ValueError(f"data set of {n} samples is smaller than one global batch of {per_update} "
                             f"(batch_size {batch_size} x world {world_size} x accum_iter {accum_iter})")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to draw, from its micro-batch ``start`` on (a run resumed inside the epoch)."""
        if start % self.accum:
            raise ValueError(f"start {start} is inside an update of {self.accum} micro-batches")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        """Samples of a whole epoch for this rank (a resumed epoch draws those from ``start`` on)."""
        return self.updates * self.accum * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        b, w, a = self.batch_size, self.world, self.accum
        for u in range(self.start // a, self.updates):
            for k in range(a):
                block = u * w * a + self.rank * a + k
                yield from order[block * b:(block + 1) * b]


def micro_index(rank: int, accum_iter: int, local_iter: int) -> int:
    """Index of a micro-batch inside its global update (the same for W x A ranks/steps as for 1 x W*A)."""
    return rank * accum_iter + local_iter % accum_iter


class StridedEvalSampler(Sampler[int]):
    """Rank r evaluates indices r, r + W, r + 2W, ...: every sample once, no padding duplicates."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
