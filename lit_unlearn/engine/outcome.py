"""What one optimizer step produced, the engine's counters, and the interface callbacks use.

The engine (:class:`~lit_unlearn.engine.module.UnlearningModule`) reads the device-side results of
a step — losses, finiteness, the agreed stop — to the host **once** per optimizer step and hands
them to the callbacks as a :class:`StepOutcome` (``outputs["outcome"]`` in ``on_train_batch_end``
and :attr:`Engine.last_outcome`). Callbacks (guards, step logging, checkpointing, reports) talk to
the engine through that outcome and the :class:`Engine` protocol, never through attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lit_unlearn.engine.state import EngineState
from lit_unlearn.logs import describe
from lit_unlearn.synthesis.diagnostics import LayerGeometry


@dataclass
class StepOutcome:
    """One optimizer step as the callbacks see it (host values, read in one synchronisation).

    Args:
        step: completed optimizer steps once this one is applied (the x-axis of every metric);
            for a skipped step, the steps completed so far plus one (the step that was attempted).
        forget_loss: effective-batch mean of the forget loss.
        retain_loss: effective-batch mean of the retain loss.
        skipped: the losses or a gradient were NaN/inf: nothing was applied, the buffers were reset.
        stop_agreed: some rank asked to stop (a signal); every rank stops after this step.
        lr: the learning rate this step was taken with.
        state: the engine's counters after this step.
        uniform_loss: the retain objective's loss of a uniform prediction (``ln V``), if it has one.
        objective_sums: what the objectives reported, summed over this rank's micro-batches
            (device tensors, ``<task>_<name>``); divide the rank-summed values by ``unit_counts``.
        unit_counts: units (tokens or sequences) of the effective batch, forget then retain
            (device tensor, already summed over ranks).
        geometry: synthesis diagnostics (device tensors) when this was a diagnostics step.
        layer_geometry: the same step's geometry per block and module type (host values).
    """

    step: int
    forget_loss: float
    retain_loss: float
    skipped: bool
    stop_agreed: bool
    lr: float
    state: EngineState
    uniform_loss: float | None = None
    objective_sums: dict[str, Tensor] = field(default_factory=dict)
    unit_counts: Tensor | None = None
    geometry: dict[str, Tensor] | None = None
    layer_geometry: LayerGeometry | None = None

    @staticmethod
    def read(losses: Tensor, finite: Tensor, stop_votes: Tensor) -> tuple[float, float, bool, bool]:
        """``(forget_loss, retain_loss, finite, stop)`` from device tensors: the step's one host sync."""
        forget, retain, ok, stop = torch.cat(
            [losses.double().reshape(2), finite.double().reshape(1), stop_votes.double().reshape(1)]
        ).tolist()
        return forget, retain, ok > 0, stop > 0


def step_outcome(outputs: Any) -> StepOutcome | None:
    """The outcome a ``training_step`` returned at an optimizer step (``outputs`` of
    ``on_train_batch_end``); ``None`` between optimizer steps."""
    outcome = outputs.get("outcome") if isinstance(outputs, dict) else None
    return outcome if isinstance(outcome, StepOutcome) else None


@runtime_checkable
class Engine(Protocol):
    """What callbacks may use of the engine (``UnlearningModule`` implements it)."""

    model: nn.Module | None
    network: Any  # ModelSetup: ``.path`` names the model's source
    synthesizer: Any
    forget_objective: Any
    retain_objective: Any
    accumulate_grad_batches: int
    state: EngineState
    last_outcome: StepOutcome | None

    @property
    def at_step_boundary(self) -> bool:
        """No micro-batch is waiting in the buffers (a checkpoint taken now resumes exactly)."""
        ...

    def request_stop(self) -> None:
        """Stop after the current optimizer step (agreed across ranks in the step's reduction)."""
        ...


def engine_of(pl_module: Any) -> Engine | None:
    """``pl_module`` as an :class:`Engine`, or ``None`` when it is some other LightningModule."""
    return pl_module if isinstance(pl_module, Engine) else None


@runtime_checkable
class HoldsModel(Protocol):
    """A LightningModule that trains one network (the engine, the relearning attack)."""

    model: nn.Module | None


def model_of(pl_module: Any) -> nn.Module | None:
    """The network ``pl_module`` trains, or ``None``."""
    return pl_module.model if isinstance(pl_module, HoldsModel) else None


def components(pl_module: Any) -> dict[str, Any]:
    """The run's model source, synthesizer and objectives as plain data (:func:`describe`): what
    the manifest, ``results.json`` and the hyper-parameters record. Empty for another module."""
    engine = engine_of(pl_module)
    if engine is None:
        return {"model": None, "synthesizer": None, "forget_objective": None, "retain_objective": None}
    return {
        "model": engine.network.path,
        "synthesizer": describe(engine.synthesizer),
        "forget_objective": describe(engine.forget_objective),
        "retain_objective": describe(engine.retain_objective),
    }
