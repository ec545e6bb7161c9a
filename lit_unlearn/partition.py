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
from typing import Any, TypeVar

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
        gather: collects one picklable object from every process, in rank order, on every
            process (``None``: one process).
    """

    rank: int = 0
    world_size: int = 1
    reduce_sum: Callable[[Tensor], Tensor] | None = None
    lockstep: bool = False
    gather: Callable[[Any], list[Any]] | None = None

    @property
    def synced(self) -> bool:
        """Forward passes are collectives here (``lockstep`` with another process to meet):
        generation must keep stepping until every process has finished its batch."""
        return self.lockstep and self.world_size > 1

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

    def whole_batches(self, items: Sequence[T], batch_size: int) -> Iterator[tuple[list[T], bool]]:
        """Like :meth:`batches`, but the batches are exactly one process's: the ``batch_size``
        blocks of ``items`` are shared out, a contiguous run of blocks per process. Use it where a
        document's result depends on its batch (padded greedy generation), so every document sees
        the same batch as in one process."""
        blocks = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
        start = self.rank * len(blocks) // self.world_size
        stop = (self.rank + 1) * len(blocks) // self.world_size
        for block in blocks[start:stop]:
            yield block, True
        if self.lockstep and blocks:
            for _ in range(math.ceil(len(blocks) / self.world_size) - (stop - start)):
                yield blocks[0], False

    def concatenate(self, local: list[T]) -> list[T]:
        """Every process's ``local`` list, joined in rank order (the whole list, on every process)."""
        if self.gather is None or self.world_size == 1:
            return list(local)
        return [item for part in self.gather(list(local)) for item in part]

    def total(self, values: Sequence[float | int] | Tensor) -> list[float]:
        """Sum ``values`` (this process's partial sums) over the processes, in float64."""
        local = torch.as_tensor(values, dtype=torch.float64)
        if self.reduce_sum is None or self.world_size == 1:
            return local.tolist()
        return self.reduce_sum(local).tolist()


SINGLE = Partition()
"""Everything on this process (one process, or rank 0 alone)."""


def trainer_partition(trainer: Any, lockstep: bool) -> Partition:
    """The partition of a Lightning ``trainer``'s processes: sums through its strategy (on the
    strategy's device: NCCL reduces GPU tensors only), objects through ``all_gather_object``."""
    strategy = trainer.strategy

    def reduce_sum(values: Tensor) -> Tensor:
        return strategy.reduce(values.to(strategy.root_device), reduce_op="sum").cpu()

    def gather(value: Any) -> list[Any]:
        import torch.distributed as dist

        parts: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(parts, value)
        return parts

    return Partition(trainer.global_rank, trainer.world_size, reduce_sum, lockstep=lockstep, gather=gather)
