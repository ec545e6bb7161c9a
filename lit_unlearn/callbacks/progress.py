"""Progress bars that name the run they show (instead of Lightning's ``v_num``)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


class _NamesRun:
    """``run=<rule>/lr<lr>_seed<seed>_<digest>`` where Lightning prints the logger version's last 4 characters."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = dict(super().get_metrics(trainer, pl_module))  # type: ignore[misc]
        metrics.pop("v_num", None)
        version = trainer.logger.version if trainer.logger is not None else None
        if version is None:
            return metrics
        method, _, run = str(version).rpartition("/")  # <forget>+<retain>_<rule>/lr.._seed.._digest
        return {"run": f"{method.rpartition('_')[2]}/{run}" if method else run, **metrics}


class RunTQDMProgressBar(_NamesRun, TQDMProgressBar):
    """Lightning's tqdm bar, naming the run."""


class RunRichProgressBar(_NamesRun, RichProgressBar):
    """Lightning's rich bar, naming the run."""


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
