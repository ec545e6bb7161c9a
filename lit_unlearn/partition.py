"""Data-parallel evaluation: which documents this process evaluates and how the sums meet.

Under DDP or FSDP every rank evaluates 1/N of a metric's documents and the per-document sums
(correct answers, summed NLL, token counts) are added over the ranks in float64, so the metric
equals the one-process value (to float rounding of the NLL sums) at 1/N of the cost. Under FSDP a
forward pass is a collective, so every rank runs the same number of batches: a rank whose share
is shorter runs dummy batches (a real document, counted nowhere).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class Partition:
    """This process's share of an evaluation.

    Args:
        rank: this process's index.
        world_size: number of processes sharing the evaluation.
        reduce_sum: adds a tensor over the processes (``None``: one process).
        lockstep: every process must run the same number of forward passes (sharded models).
    """

    rank: int = 0
    world_size: int = 1
    reduce_sum: Callable[[Tensor], Tensor] | None = None
    lockstep: bool = False

    def batches(self, items: Sequence[T], batch_size: int) -> Iterator[tuple[list[T], bool]]:
        """``(batch, counted)`` pairs of this process's items: contiguous blocks of ``items``
        (rank r takes the r-th of ``world_size`` near-equal blocks), ``batch_size`` at a time.
        With ``lockstep``, extra ``(dummy batch, False)`` pairs pad every process to the same
        number of batches; a dummy batch must be run and its result ignored."""
        n = len(items)
        start, stop = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        mine = list(items[start:stop])
        count = math.ceil(len(mine) / batch_size)
        for i in range(count):
            yield mine[i * batch_size : (i + 1) * batch_size], True
        if self.lockstep and n:
            most = math.ceil(math.ceil(n / self.world_size) / batch_size)
            for _ in range(most - count):
                yield [items[0]], False

    def total(self, values: Sequence[float | int] | Tensor) -> list[float]:
        """Sum ``values`` (this process's partial sums) over the processes, in float64."""
        local = torch.as_tensor(values, dtype=torch.float64)
        if self.reduce_sum is None or self.world_size == 1:
            return local.tolist()
        return self.reduce_sum(local).tolist()


SINGLE = Partition()
"""Everything on this process (one process, or rank 0 alone)."""
