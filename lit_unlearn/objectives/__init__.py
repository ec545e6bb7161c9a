"""Forget and retain objectives (docs/method.md), injected into the engine by class path."""

from lit_unlearn.objectives.base import Objective
from lit_unlearn.objectives.forget import NPO, RMU, GradientAscent, SimNPO
from lit_unlearn.objectives.retain import KL, NLL, EmbedDiff

__all__ = ["KL", "NLL", "NPO", "RMU", "EmbedDiff", "GradientAscent", "Objective", "SimNPO"]
