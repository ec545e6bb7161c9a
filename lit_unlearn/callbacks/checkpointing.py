"""Nothing lost on interruption: ``last.ckpt`` kept current, written on SIGTERM/SIGINT and on errors.

:class:`RunCheckpoint` is always part of a ``lit-unlearn fit`` run (``--checkpoint.*`` flags):

- every ``every_n_train_steps`` optimizer steps and at the end of training it writes
  ``<run dir>/checkpoints/last.ckpt`` (optimizer, scheduler, data position, RNG, evaluator and
  report state: ``--ckpt_path last.ckpt`` continues exactly where the run stopped). The end of
  training is saved after the final evaluation, so the last checkpoint holds what
  ``results.json`` reports;
- every save is written beside ``last.ckpt`` under a temporary name, fsynced and renamed over
  it (never through ``$TMPDIR``; a kill or a full disk mid-save leaves the previous one intact),
  with a digest that refuses a corrupted checkpoint on resume (``lit_unlearn.checkpoint_files``);
  what a killed save left behind is removed when the next run in that directory starts;
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
import os
import signal
import sys
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_unlearn.checkpoint_files import (
    VerifiedCheckpointIO,
    remove_orphans,
    replace_directory,
    temporary_name,
    write_directory_digest,
)
from lit_unlearn.engine.outcome import Engine, engine_of, step_outcome
from lit_unlearn.errors import RunInterrupted, TrainingDiverged, UserError
from lit_unlearn.rundir import MODEL_DIR, RESULTS_FILE, run_directory

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` current and writes it on interruption (see the module docstring).

    Args:
        every_n_train_steps: write ``last.ckpt`` every N optimizer steps (0 = at the end and on signals).
        dirpath: where ``last.ckpt`` goes (default: ``<run dir>/checkpoints``).
        handle_signals: on SIGTERM/SIGINT: finish the step, save, exit.
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
        self._engine: Engine | None = None
        self._saved_evaluations = -1  # evaluations recorded when last.ckpt was last written
        self._finishing = False  # training done, final checkpoint written, outputs being saved
        self._run_dir: str | None = None

    @property
    def state_key(self) -> str:
        return "RunCheckpoint"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own plugin alone
            trainer.strategy.checkpoint_io = VerifiedCheckpointIO()
        run_dir = self._run_dir = run_directory(trainer)  # collective under DDP: every rank calls it
        if stage == "fit":
            self._install_handlers()
        if trainer.is_global_zero and stage == "fit":
            # leftovers of a save killed in an earlier segment of this run (the directories are this run's own)
            for directory in {str(self.dirpath or ""), run_dir} - {""}:
                for path in remove_orphans(directory):
                    log.info("removed %s, left by an interrupted save", path)

    # ------------------------------------------------------------------ periodic and final saves
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        outcome = step_outcome(outputs)
        if outcome is not None and outcome.stop_agreed:
            path = self._save_last(trainer)
            raise RunInterrupted(self._signal_name or "SIGTERM", trainer.global_step, path)
        n = self._every_n_train_steps
        if n and trainer.global_step % n == 0 and _at_step_boundary(pl_module):
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: saves are step-based (and at the end of training)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: saves are step-based (and at the end of training)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)
        self._finishing = True  # from here a signal stops the export at once: the checkpoint is final

    def _save_last(self, trainer: L.Trainer) -> str:
        # A step saved before the final evaluation is saved again: the evaluator's history is part
        # of the checkpoint, and a resume or a recovery must report what this run reported.
        evaluations = _evaluations(trainer)
        if (
            self._last_global_step_saved != trainer.global_step
            or not self.last_model_path
            or evaluations != self._saved_evaluations
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._saved_evaluations = evaluations
        return self.last_model_path

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Write ``filepath`` so that it is never partly written: a single file goes through
        :class:`VerifiedCheckpointIO` (temporary name beside it, fsync, rename); a sharded
        checkpoint (a directory, written by every rank) is written under a temporary name, given
        a digest file and swapped in by rank 0."""
        direct = isinstance(trainer.strategy.checkpoint_io, VerifiedCheckpointIO) and not getattr(
            trainer.strategy, "_save_distributed_checkpoint", False
        )
        if direct:
            return super()._save_checkpoint(trainer, filepath)
        tmp = trainer.strategy.broadcast(temporary_name(filepath))
        super()._save_checkpoint(trainer, tmp)  # trainer.save_checkpoint ends with a barrier
        if trainer.is_global_zero:
            if os.path.isdir(tmp):
                write_directory_digest(tmp)
            replace_directory(tmp, filepath)
        self._last_checkpoint_saved = filepath

    # ------------------------------------------------------------------ errors
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, (RunInterrupted, TrainingDiverged, UserError, KeyboardInterrupt)):
            return  # saved already / a broken model / nothing trained / aborted mid-step
        if (
            trainer.world_size > 1
            or engine_of(pl_module) is None
            or not _at_step_boundary(pl_module)
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
    def _install_handlers(self) -> None:
        """Our SIGTERM/SIGINT handler; the handlers found the first time are restored in teardown."""
        if not self.handle_signals:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                return
            self._previous.setdefault(sig, previous)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed in setup too: Lightning captures the handlers it finds when training starts and
        # puts them back *before* on_fit_end, so ours also covers the export of the model and
        # results. Here it replaces Lightning's own SIGTERM handler for the training loop.
        self._engine = engine_of(pl_module)
        self._install_handlers()
        if self._signal_name is not None and self._engine is not None:
            self._engine.request_stop()  # a signal during set-up: stop at the first step boundary

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        path = self.last_model_path if self.last_model_path and os.path.exists(self.last_model_path) else None
        step = self._last_global_step_saved
        if self._finishing:
            # The final checkpoint is written; stop the export now (its temporary folder is removed).
            raise RunInterrupted(
                name,
                step,
                path,
                f"{name} while saving the run's outputs (missing: {', '.join(self._missing_outputs()) or 'none'}); "
                f"the finished training (step {step}, final evaluation included) is in {path}; run the same "
                f"command plus --ckpt_path {path} to write them",
            )
        if self._signal_name is not None and signum == signal.SIGINT:
            # second Ctrl-C: abort now, mid-step; the last periodic checkpoint stays
            where = (
                f"last checkpoint: {path} (step {step}); resume with the same command plus --ckpt_path {path}"
                if path
                else "no checkpoint was written yet"
            )
            raise RunInterrupted(name, step, path, f"aborted by a second {name} (nothing saved now); {where}")
        self._signal_name = self._signal_name or name
        if self._engine is not None:
            self._engine.request_stop()
        print(
            f"\nlit-unlearn: {name} received: finishing this optimizer step, then saving last.ckpt "
            "(Ctrl-C again aborts without saving)",
            file=sys.stderr,
            flush=True,
        )

    def _missing_outputs(self) -> list[str]:
        run_dir = self._run_dir or ""
        return [name for name in (MODEL_DIR, RESULTS_FILE) if not os.path.exists(os.path.join(run_dir, name))]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _at_step_boundary(pl_module: L.LightningModule) -> bool:
    """No micro-batch waits in the engine's buffers (any other module: always)."""
    engine = engine_of(pl_module)
    return engine is None or engine.at_step_boundary


def _evaluations(trainer: L.Trainer) -> int:
    """How many evaluations the run's evaluators have recorded (their history is checkpointed)."""
    callbacks: list[Any] = list(getattr(trainer, "callbacks", []))
    total = 0
    for cb in callbacks:
        if hasattr(cb, "matched_step"):
            total += len(getattr(cb, "history", None) or ())
    return total
