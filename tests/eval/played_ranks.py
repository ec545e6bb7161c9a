"""Two data-parallel processes played by hand in one test process: rank 1 runs first and its
collectives are recorded; rank 0's collectives then combine its own share with rank 1's, so rank
0's result is what a real 2-process run computes."""

from __future__ import annotations

from typing import Any

from lit_unlearn.partition import Partition


class PlayedRanks:
    """Run the evaluation with :meth:`partition` of rank 1, then of rank 0 (:attr:`ORDER`).

    Args:
        lockstep: the partitions' ``lockstep`` (a sharded model).
    """

    ORDER = (1, 0)

    def __init__(self, lockstep: bool) -> None:
        self.lockstep = lockstep
        self.sums: list[Any] = []
        self.parts: list[Any] = []

    def partition(self, rank: int) -> Partition:
        """Rank ``rank`` of 2, with hand-played sums and gathers."""

        def reduce_sum(local: Any) -> Any:
            if rank == 1:
                self.sums.append(local.clone())
                return local
            return local + self.sums.pop(0)

        def gather(local: Any) -> list[Any]:
            if rank == 1:
                self.parts.append(local)
                return [local, local]
            return [local, self.parts.pop(0)]

        return Partition(rank, 2, reduce_sum, lockstep=self.lockstep, gather=gather)

    @property
    def drained(self) -> bool:
        """Every collective of rank 1 was met by rank 0."""
        return not self.sums and not self.parts


def record_synced(monkeypatch: Any, module: Any) -> list[bool]:
    """Replace ``module.greedy_generate`` by one that records its ``synced`` flag and generates
    unsynced (one process here); returns the list of flags."""
    flags: list[bool] = []
    real = module.greedy_generate

    def generate(*args: Any, synced: bool = False, **kwargs: Any) -> Any:
        flags.append(synced)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "greedy_generate", generate)
    return flags
