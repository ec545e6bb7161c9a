"""Training metrics of each optimizer step, from its :class:`StepOutcome`.

Every optimizer step: ``train/forget_loss`` and ``train/retain_loss`` on the progress bar. Every
``log_every_n_steps`` optimizer steps (indexed by completed steps, as evaluations are, whatever the
accumulation): the losses, the learning rate and what the objectives report (effective-batch
means, one small all-reduce); on diagnostics steps, the synthesis geometry, in total (``train/...``)
and per layer and module type (``per_layer/<key>/layer_NN``, ``per_type/<key>/<type>``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lit_unlearn.engine.outcome import StepOutcome, step_outcome
from lit_unlearn.logs import log_at_step


def objective_means(trainer: L.Trainer, outcome: StepOutcome) -> dict[str, Tensor]:
    """Effective-batch means of the objectives' own metrics (summed over ranks; every rank logs
    on the same steps, so the collective matches)."""
    if not outcome.objective_sums or outcome.unit_counts is None:
        return {}
    names = sorted(outcome.objective_sums)
    counts = outcome.unit_counts
    sums = torch.stack([torch.as_tensor(outcome.objective_sums[n], device=counts.device) for n in names])
    if trainer.world_size > 1:
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
    return {n: sums[i] / counts[0 if n.startswith("forget_") else 1] for i, n in enumerate(names)}


class StepLogger(L.Callback):
    """Logs each optimizer step's losses, learning rate, objective metrics and geometry."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        outcome = step_outcome(outputs)
        if outcome is None or outcome.skipped:
            return
        losses = {"train/forget_loss": outcome.forget_loss, "train/retain_loss": outcome.retain_loss}
        pl_module.log_dict(losses, prog_bar=True, logger=False)
        every, metrics = trainer.log_every_n_steps, {}
        if every and outcome.step % every == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]  # after the scheduler's step
            metrics = {"forget_loss": outcome.forget_loss, "retain_loss": outcome.retain_loss, "lr": lr}
            metrics.update(objective_means(trainer, outcome))
        if outcome.geometry is not None:
            metrics.update(outcome.geometry)
        if metrics:
            log_at_step(trainer, {f"train/{k}": v for k, v in metrics.items()}, outcome.step)
        if outcome.layer_geometry is not None:
            log_at_step(trainer, outcome.layer_geometry.scalars(), outcome.step)
