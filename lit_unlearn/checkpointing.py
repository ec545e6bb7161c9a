"""Nothing lost on interruption: ``last.ckpt`` kept current, written on SIGTERM/SIGINT and on errors.

:class:`RunCheckpoint` is always part of a ``lit-unlearn fit`` run (``--checkpoint.*`` flags):

- every ``every_n_train_steps`` optimizer steps and at the end of training it writes
  ``<run dir>/checkpoints/last.ckpt`` (optimizer, scheduler, data position, RNG, evaluator and
  report state: ``--ckpt_path last.ckpt`` continues exactly where the run stopped);
- on SIGTERM (a scheduler's time limit, ``kill``) or Ctrl-C it lets the current optimizer step
  finish, writes ``last.ckpt`` and exits with 143 / 130. Ranks agree on the stop inside the
  step's existing reduction, so a signal that reaches one rank stops all of them at the same
  step. A second Ctrl-C aborts at once (the periodic ``last.ckpt`` stays);
- on an error in a one-process run it writes ``last.ckpt`` when the state is consistent (at an
  optimizer-step boundary); never for a diverged model, whose last good ``last.ckpt`` is kept.
  Multi-process runs rely on the periodic and signal checkpoints (a rank that fails alone cannot
  join the collective save).
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_unlearn.errors import RunInterrupted, TrainingDiverged, UserError

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current and writes it on interruption (see the module docstring).

    Args:
        every_n_train_steps: write ``last.ckpt`` every N optimizer steps (0 = only at the end of
            training, on SIGTERM/SIGINT and on errors).
        dirpath: where ``last.ckpt`` goes (default: ``<run dir>/checkpoints``).
        handle_signals: stop cleanly on SIGTERM/SIGINT (finish the step, save, exit 143/130).
    """

    def __init__(
        self, every_n_train_steps: int = 50, dirpath: str | None = None, handle_signals: bool = True
    ) -> None:
        if every_n_train_steps < 0:
            raise UserError(f"--checkpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=0,
            enable_version_counter=False,
        )
        self.handle_signals = handle_signals
        self._previous: dict[int, Any] = {}
        self._signal_name: str | None = None
        self._module: Any = None

    @property
    def state_key(self) -> str:
        return "RunCheckpoint"

    # ------------------------------------------------------------------ periodic and final saves
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if getattr(pl_module, "stop_agreed", False):
            path = self._save_last(trainer)
            raise RunInterrupted(self._signal_name or "SIGTERM", trainer.global_step, path)
        n = self._every_n_train_steps
        if n and trainer.global_step % n == 0 and getattr(pl_module, "at_step_boundary", True):
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: saves are step-based (and at the end of training)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: saves are step-based (and at the end of training)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def _save_last(self, trainer: L.Trainer) -> str:
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path

    # ------------------------------------------------------------------ errors
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, (RunInterrupted, TrainingDiverged, UserError, KeyboardInterrupt)):
            return  # saved already / a broken model / nothing trained / aborted mid-step
        if (
            trainer.world_size > 1
            or not getattr(pl_module, "at_step_boundary", False)
            or trainer.global_step == 0
        ):
            return
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        try:
            path = self._save_last(trainer)
            print(
                f"lit-unlearn: {type(exception).__name__} at step {trainer.global_step}; state saved to {path}",
                file=sys.stderr,
            )
        except Exception as err:  # never hide the original error behind a failing save
            log.warning("could not write last.ckpt after %s: %s", type(exception).__name__, err)

    # ------------------------------------------------------------------ signals
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._module = pl_module
        if not self.handle_signals:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:  # replaces Lightning's own SIGTERM handler for the training loop; restored in teardown
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._module is not None and self._module.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now, keep the last periodic checkpoint
        self._signal_name = self._signal_name or name
        if self._module is not None:
            self._module.stop_requested = True
        print(
            f"\nlit-unlearn: {name} received: finishing this optimizer step, then saving last.ckpt "
            "(Ctrl-C again aborts without saving)",
            file=sys.stderr,
            flush=True,
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
