"""Forget and retain objectives (docs/method.md), injected into the engine by class path."""

from lit_unlearn.objectives.base import Objective
from lit_unlearn.objectives.forget import CEU, DPO, NPO, RMU, UNDIAL, WGA, GradientAscent, SatImp, SimNPO
from lit_unlearn.objectives.retain import KL, NLL, EmbedDiff

__all__ = [
    "CEU",
    "DPO",
    "KL",
    "NLL",
    "NPO",
    "RMU",
    "UNDIAL",
    "WGA",
    "EmbedDiff",
    "GradientAscent",
    "Objective",
    "SatImp",
    "SimNPO",
]
