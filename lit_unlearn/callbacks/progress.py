"""Progress bars that name the run they show (instead of Lightning's ``v_num``)."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


class _NamesRun:
    """``run=<rule>/lr<lr>_seed<seed>_<digest>`` where Lightning prints the logger version's last 4 characters."""

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 3/-2" for a run bounded by steps (max_epochs -1)
        trainer = self.trainer  # type: ignore[attr-defined]
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)  # type: ignore[misc]

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = dict(super().get_metrics(trainer, pl_module))  # type: ignore[misc]
        metrics.pop("v_num", None)
        logger = trainer.logger
        version = logger.version if logger is not None else None
        if version is None:
            return metrics
        if not str(
            version
        ):  # an explicit empty version (e.g. the demo's runs/demo/sago/seed0): the folder's tail
            parts = os.path.normpath(str(getattr(logger, "log_dir", "") or "")).split(os.sep)
            return {"run": "/".join(parts[-2:]), **metrics} if parts[-1] else metrics
        method, _, run = str(version).rpartition("/")  # <rule>_<forget>+<retain>/lr.._seed.._digest
        return {"run": f"{method.partition('_')[0]}/{run}" if method else run, **metrics}


class RunTQDMProgressBar(_NamesRun, TQDMProgressBar):
    """Lightning's tqdm bar, naming the run."""


class RunRichProgressBar(_NamesRun, RichProgressBar):
    """Lightning's rich bar, naming the run, and stopped when training ends: what fit prints
    afterwards (the summary, where the results are) is not followed by a redrawn bar."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_progress()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._progress_stopped:  # stopping twice prints an empty line
            super().teardown(trainer, pl_module, stage)


def name_the_run(callbacks: list[Any]) -> None:
    """Replace Lightning's default bar (rich or tqdm, unconfigured) in ``callbacks`` by one that
    names the run; a bar the user configured is left alone."""
    for i, cb in enumerate(callbacks):
        if type(cb) is RichProgressBar:
            callbacks[i] = RunRichProgressBar(cb._refresh_rate, cb._leave, cb.theme, cb._console_kwargs)
        elif type(cb) is TQDMProgressBar:
            callbacks[i] = RunTQDMProgressBar(cb.refresh_rate, cb.process_position, cb._leave)
        if isinstance(cb, ProgressBar):
            return
