"""Learning-rate schedules: ``transformers.get_scheduler`` with the Hugging Face Trainer's conventions.

The official unlearning runs used the HF Trainer's schedule: ``ceil(warmup_ratio x steps)`` warm-up
steps rising linearly from 0 (the first optimizer step has learning rate 0), then linear decay to
0 at the last step. :func:`lr_schedule` builds exactly that (and the constant and cosine variants),
stepped once per optimizer step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from transformers import get_scheduler

Decay = Literal["constant", "linear", "cosine"]


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """The HF Trainer's warm-up length: ``ceil(warmup_ratio x total_steps)``."""
    return math.ceil(warmup_ratio * total_steps)


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.0,
    decay: Decay = "constant",
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-optimizer-step schedule.

    Args:
        optimizer: the optimizer whose learning rates it scales.
        total_steps: optimizer steps of the whole run.
        warmup_ratio: share of ``total_steps`` with linear warm-up from 0.
        decay: ``constant``, ``linear`` (to 0 at ``total_steps``) or ``cosine``.
        warmup_steps: warm-up length in steps (overrides ``warmup_ratio``).
        min_lr_ratio: floor of the cosine decay, as a fraction of the peak learning rate.
    """
    warmup = warmup_steps if warmup_steps is not None else warmup_steps_for(total_steps, warmup_ratio)
    if decay == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    if decay == "cosine" and min_lr_ratio > 0:
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio},
        )
    return get_scheduler(decay, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
