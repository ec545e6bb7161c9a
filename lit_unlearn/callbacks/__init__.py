"""Callbacks around the engine: guards, step logging, checkpointing, export, manifest, progress.

They read each optimizer step's :class:`~lit_unlearn.engine.outcome.StepOutcome` and use the
engine through the :class:`~lit_unlearn.engine.outcome.Engine` protocol only.
"""

from __future__ import annotations

import lightning as L

from lit_unlearn.callbacks.guards import AccumulationCheck, AdaptersMovedGuard, CollapseGuard, NonFiniteGuard
from lit_unlearn.callbacks.step_logging import StepLogger

__all__ = [
    "AccumulationCheck",
    "AdaptersMovedGuard",
    "CollapseGuard",
    "NonFiniteGuard",
    "StepLogger",
    "engine_callbacks",
]


def engine_callbacks(
    nonfinite: NonFiniteGuard | None = None, collapse: CollapseGuard | None = None
) -> list[L.Callback]:
    """What every run of the engine needs besides checkpointing: the guards (default settings
    unless given) and the step logger. ``lit-unlearn fit`` adds these itself; pass them to a
    ``Trainer`` you build in Python."""
    return [
        nonfinite or NonFiniteGuard(),
        collapse or CollapseGuard(),
        AdaptersMovedGuard(),
        AccumulationCheck(),
        StepLogger(),
    ]
