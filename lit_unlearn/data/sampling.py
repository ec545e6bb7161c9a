"""Deterministic, rank-aware pairing of forget and retain batches.

The *global* batch sequence is a pure function of ``(seed, epoch, batch index)``:

- forget: epoch ``e`` walks a permutation of the forget set seeded by ``(seed, e)`` in global
  batches of ``forget_batch_size × world_size``; the epoch ends when the forget set is used up
  (the paper's protocol: epoch length is anchored on the forget set);
- retain: an endless stream of permutations of the retain set, each seeded by
  ``(seed, cycle)``, read in global batches of ``retain_batch_size × world_size``; epoch ``e``
  starts where epoch ``e - 1`` stopped, so the retain stream cycles independently.

Rank ``r`` takes slice ``r`` of every global batch. Consequences: no randomness in
``__getitem__`` or the global RNG, so ``num_workers`` does not matter; ranks never share samples
within a batch; N ranks × batch b see exactly the batches of 1 rank × batch N·b, and k
consecutive micro-batches of size b are one batch of size k·b (for divisible set sizes); resuming
is skipping a known number of batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_FORGET_STREAM, _RETAIN_STREAM = 0x5EED_F0, 0x5EED_7E


def _permutation(n: int, seed: int, stream: int, index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + index) % (2**63 - 1))
    return torch.randperm(n, generator=gen)


class PairedBatchSampler(Sampler[tuple[list[int], list[int]]]):
    """Yields ``(forget_indices, retain_indices)`` for one rank, one item per training batch.

    Args:
        forget_size: number of forget examples.
        retain_size: number of retain examples.
        forget_batch_size: per-rank forget batch size.
        retain_batch_size: per-rank retain batch size.
        seed: run seed; with the epoch it fixes every batch.
        rank: this process's rank.
        world_size: number of data-parallel processes.
        shuffle: shuffle (else sequential order, still cycling the retain set).
    """

    def __init__(
        self,
        forget_size: int,
        retain_size: int,
        forget_batch_size: int,
        retain_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if forget_size <= 0 or retain_size <= 0:
            raise ValueError(f"forget and retain sets must be non-empty, got {forget_size} and {retain_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.forget_size, self.retain_size = forget_size, retain_size
        self.forget_batch_size, self.retain_batch_size = forget_batch_size, retain_batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.global_forget = forget_batch_size * world_size
        self.global_retain = retain_batch_size * world_size
        if forget_size < self.global_forget:
            raise ValueError(
                f"the forget set has {forget_size} examples, fewer than one global batch "
                f"({forget_batch_size} x {world_size} ranks): lower the forget batch size"
            )
        self.epoch = 0
        self._skip: tuple[int | None, int] = (None, 0)  # (epoch it applies to, batches)

    def __len__(self) -> int:
        return self.forget_size // self.global_forget

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start."""
        self.epoch = epoch

    def skip(self, batches: int, epoch: int | None = None) -> None:
        """Skip the first ``batches`` batches of the next iteration (mid-epoch resume).

        With ``epoch``, the skip applies only if the next iteration walks that epoch: a checkpoint
        written after an epoch's last batch resumes in the next epoch (Lightning advances the epoch
        itself), whose batches must all be seen."""
        self._skip = (epoch, batches)

    def _order(self, size: int, stream: int, index: int) -> torch.Tensor:
        return _permutation(size, self.seed, stream, index) if self.shuffle else torch.arange(size)

    def _retain_slice(self, start: int, count: int) -> list[int]:
        out: list[int] = []
        while count > 0:
            cycle, offset = divmod(start, self.retain_size)
            take = min(count, self.retain_size - offset)
            out += self._order(self.retain_size, _RETAIN_STREAM, cycle)[offset : offset + take].tolist()
            start, count = start + take, count - take
        return out

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        forget_order = self._order(self.forget_size, _FORGET_STREAM, self.epoch).tolist()
        n = len(self)
        retain_start = self.epoch * n * self.global_retain
        (skip_epoch, skipped), self._skip = self._skip, (None, 0)
        first = skipped if skip_epoch in (None, self.epoch) else 0
        for b in range(first, n):
            f = forget_order[b * self.global_forget : (b + 1) * self.global_forget]
            r = self._retain_slice(retain_start + b * self.global_retain, self.global_retain)
            fb, rb = self.forget_batch_size, self.retain_batch_size
            yield f[self.rank * fb : (self.rank + 1) * fb], r[self.rank * rb : (self.rank + 1) * rb]
