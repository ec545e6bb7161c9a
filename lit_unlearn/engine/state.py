"""The engine's counters and the random-number state a checkpoint carries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

from lit_unlearn.engine.checks import check_batch_layout


@dataclass
class EngineState:
    """Counters the engine keeps across steps (checkpointed, so a resumed run continues them).

    Args:
        skipped_steps: optimizer steps skipped for NaN/inf losses or gradients, in the whole run.
        consecutive_skipped: skipped steps since the last applied one.
        retain_baseline: the retain loss of the first applied step (the collapse guard's reference).
        last_geometry: synthesis diagnostics of the last diagnosed step (``step`` included).
    """

    skipped_steps: int = 0
    consecutive_skipped: int = 0
    retain_baseline: float | None = None
    last_geometry: dict[str, float] | None = None

    def count(self, applied: bool, retain_loss: float) -> EngineState:
        """Record one optimizer step: applied (its retain loss may become the baseline) or skipped."""
        self.consecutive_skipped = 0 if applied else self.consecutive_skipped + 1
        self.skipped_steps += not applied
        if applied and self.retain_baseline is None:
            self.retain_baseline = retain_loss
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (missing keys keep their defaults)."""
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


def rng_state() -> dict[str, Any]:
    """Every generator Lightning seeds (torch, CUDA, numpy, Python), in a form that loads with
    ``torch.load(weights_only=True)`` (numpy's key array as a tensor)."""
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    kind, keys, *rest = states["numpy"]
    states["numpy"] = (kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), *rest)
    return states


def restore_rng_state(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` saved."""
    states = dict(states)
    if "numpy" in states:
        kind, keys, *rest = states["numpy"]
        states["numpy"] = (
            kind,
            np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, dtype=np.uint32),
            *rest,
        )
    if not torch.cuda.is_available():
        states.pop("torch.cuda", None)
    _set_rng_states(states)


def save_engine(
    state: EngineState, layout: dict[str, int], objectives: Mapping[Any, Any], rule: Any
) -> dict[str, Any]:
    """What a checkpoint holds beyond weights, optimizer and loop: RNG, counters, the batch layout
    (a resume must keep it) and the state of the objectives and the synthesizer."""
    return {
        "rng": rng_state(),
        "engine": state.state_dict(),
        "batch_layout": layout,
        "objectives": {task: objective.state_dict() for task, objective in objectives.items()},
        "synthesizer": rule.state_dict(),
    }


def restore_engine(
    saved: dict[str, Any],
    layout: dict[str, int] | None,
    state: EngineState,
    objectives: Mapping[Any, Any],
    rule: Any,
) -> None:
    """Put back what :func:`save_engine` saved, after checking the batch layout against ``layout``
    (this run's; ``None`` = no trainer, nothing to compare)."""
    if layout is not None:
        check_batch_layout(saved.get("batch_layout"), layout)
    if "rng" in saved:
        restore_rng_state(saved["rng"])
    state.load_state_dict(saved.get("engine", {}))
    for task, objective in objectives.items():
        objective.load_state_dict(saved.get("objectives", {}).get(task, {}))
    rule.load_state_dict(saved.get("synthesizer", {}))
