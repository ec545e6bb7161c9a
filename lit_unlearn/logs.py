"""One way to record a metric: :func:`log_at_step`.

Training metrics, evaluations and lm-eval results are all indexed by completed optimizer steps
(whatever the accumulation), so train and val curves share one x-axis in TensorBoard. Lightning's
``self.log`` indexes by its own batch counter and only works inside certain hooks, hence this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def log_at_step(trainer: Any, metrics: Mapping[str, Any], step: int) -> None:
    """Send ``metrics`` to every logger at ``step`` and keep them in ``trainer.callback_metrics``
    (for monitors, the progress bar and later callbacks).

    Args:
        trainer: the running Trainer.
        metrics: name -> number or 0-d tensor (tensors are read once here: a host sync, so call it
            on logging steps only).
        step: the x-axis value, normally the number of completed optimizer steps.
    """
    values = {name: float(value) for name, value in metrics.items()}
    if not values:
        return
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})
