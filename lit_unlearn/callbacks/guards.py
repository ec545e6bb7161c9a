"""Guards: callbacks that watch each optimizer step's :class:`StepOutcome` and stop a run that
has gone wrong, with a message that says what to change.

- :class:`NonFiniteGuard`: the engine skips a step whose losses or gradients are NaN/inf; this
  warns, logs ``train/skipped_steps`` and stops after too many in a row.
- :class:`CollapseGuard`: stops (exit code 3, no model saved, the last ``last.ckpt`` kept) when the
  retain loss stays near that of a uniform prediction — a model destroyed by a far too high
  learning rate. It acts *before* the update of the offending step is applied.
- :class:`AdaptersMovedGuard`: a LoRA run whose first real step changes no adapter weight trains
  nothing; stop at once instead of after hours.
- :class:`AccumulationCheck`: warns when an epoch's batches are not a multiple of the accumulation.

``lit-unlearn fit`` installs them all (``--nonfinite_guard.*``, ``--collapse_guard.*``); from
Python, :func:`lit_unlearn.callbacks.engine_callbacks` gives the same set.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lit_unlearn.adapters import adapter_weights, is_adapted
from lit_unlearn.engine.outcome import StepOutcome, engine_of, step_outcome
from lit_unlearn.errors import TrainingDiverged, UserError
from lit_unlearn.logs import log_at_step

log = logging.getLogger(__name__)


class NonFiniteGuard(L.Callback):
    """Reports skipped (NaN/inf) optimizer steps and stops after too many in a row.

    Args:
        max_consecutive: stop after N skipped (NaN/inf) steps in a row.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise UserError(f"--nonfinite_guard.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        outcome = step_outcome(outputs)
        if outcome is None or not outcome.skipped:
            return
        log_at_step(trainer, {"train/skipped_steps": outcome.state.skipped_steps}, outcome.step - 1)
        log.warning(
            "skipped optimizer step: non-finite loss or gradient (forget_loss=%s, retain_loss=%s)",
            outcome.forget_loss,
            outcome.retain_loss,
        )
        if outcome.state.consecutive_skipped >= self.max_consecutive:
            raise TrainingDiverged(
                f"{outcome.state.consecutive_skipped} consecutive optimizer steps had NaN/inf losses or gradients "
                f"(last forget_loss={outcome.forget_loss}, retain_loss={outcome.retain_loss}); lower the learning "
                "rate, check the data, or raise --nonfinite_guard.max_consecutive"
            )


class CollapseGuard(L.Callback):
    """Stops a run whose model has collapsed, before the collapsed step's update is applied.

    The bound is ``threshold × ln V`` (the loss of a uniform prediction over the vocabulary), but
    at least twice the retain loss of the first applied step, since an untrained model starts near
    uniform. 0.8 × ln V is ~8.3 nats for a 32 k vocabulary (perplexity ~4,000), far above any
    usable model. ``patience`` > 1 because one hard batch can spike the loss for a step, while a
    collapsed model stays there. Applies to retain losses that define a uniform loss (``NLL``); KL
    and EmbedDiff start at 0 and are not checked.

    Args:
        threshold: the bound as a fraction of ``ln V``; ``None`` = off.
        patience: optimizer steps in a row above the bound before the run stops.
    """

    def __init__(self, threshold: float | None = 0.8, patience: int = 3) -> None:
        if patience < 1:
            raise UserError(f"--collapse_guard.patience must be >= 1, got {patience}")
        if threshold is not None and not threshold > 0:
            raise UserError(
                f"--collapse_guard.threshold must be > 0 (or null to switch the guard off), got {threshold}"
            )
        self.threshold, self.patience = threshold, patience
        self.steps_above = 0  # consecutive optimizer steps above the bound (checkpointed)

    def bound(self, outcome: StepOutcome) -> float | None:
        """The retain loss above which a step counts as collapsed (``None``: no bound)."""
        if self.threshold is None or outcome.uniform_loss is None or outcome.state.retain_baseline is None:
            return None
        return max(2 * outcome.state.retain_baseline, self.threshold * outcome.uniform_loss)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        engine = engine_of(pl_module)
        if engine is not None and engine.last_outcome is not None:
            self.observe(engine.last_outcome)

    def observe(self, outcome: StepOutcome) -> None:
        """Count a step about to be applied; raise once ``patience`` steps in a row were above the bound."""
        if outcome.skipped:
            return
        bound = self.bound(outcome)
        self.steps_above = self.steps_above + 1 if bound is not None and outcome.retain_loss > bound else 0
        if self.steps_above >= self.patience:
            raise TrainingDiverged(
                f"the retain loss stayed above --collapse_guard.threshold={self.threshold} x the loss of a "
                f"uniform prediction (ln V = {outcome.uniform_loss:.4g}) for {self.steps_above} optimizer steps "
                f"(last: {outcome.retain_loss:.4g} at step {outcome.step}): the model has collapsed (lower the "
                "learning rate); no unlearned model was saved"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"steps_above": self.steps_above}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_above = int(state_dict.get("steps_above", 0))


class AdaptersMovedGuard(L.Callback):
    """After the first optimizer step with a learning rate > 0, at least one adapter weight must
    have changed (a LoRA run whose gradients never reach the adapters would train nothing,
    silently). One comparison in the whole run."""

    def __init__(self) -> None:
        self._before: list[Tensor] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = engine_of(pl_module)
        model = engine.model if engine is not None else None
        self._before = adapter_weights(model) if model is not None and is_adapted(model) else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        outcome, engine = step_outcome(outputs), engine_of(pl_module)
        if self._before is None or outcome is None or outcome.skipped or not outcome.lr > 0:
            return  # warm-up starts at lr 0
        assert engine is not None and engine.model is not None
        now = [p.detach() for p in engine.model.parameters() if p.requires_grad]
        moved = torch.stack([(a != b).any() for a, b in zip(self._before, now)]).any()
        self._before = None
        if not bool(moved):
            raise TrainingDiverged(
                "no adapter weight changed in the first optimizer step: the gradients do not reach the "
                "adapters (check --model.network.adapter.target_modules, a learning rate > 0, and that nothing "
                "detaches the inputs of checkpointed layers); no model was saved"
            )


class AccumulationCheck(L.Callback):
    """Warns when an epoch's batches are not a multiple of ``accumulate_grad_batches``: the last
    optimizer step of each epoch then averages over fewer micro-batches."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = engine_of(pl_module)
        k = engine.accumulate_grad_batches if engine is not None else 1
        batches = trainer.num_training_batches
        if k > 1 and math.isfinite(batches) and batches % k:
            log.warning(
                "an epoch has %d batches, not a multiple of accumulate_grad_batches=%d: the last optimizer "
                "step of each epoch averages over fewer micro-batches",
                batches,
                k,
            )
