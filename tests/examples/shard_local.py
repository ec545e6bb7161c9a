"""What a sharded PCGrad must not do: take its dot products per shard (the official ZeRO-3 runs
did). Test-only: ``tests/integration/test_fsdp.py`` shows it departs from the 1-process result
while ``PCGrad`` does not."""

from __future__ import annotations

from typing import Any

from lit_unlearn.synthesis import PCGrad, Synthesizer


class ShardLocalPCGrad(PCGrad):
    """PCGrad that ignores the engine's cross-rank reducer (shard-local dot products).

    Args:
        forget_weight: γ.
        retain_weight: α.
    """

    def use_reducer(self, reducer: Any) -> Synthesizer:
        return self  # keep local_sum: every rank projects with its own shard's dot products
