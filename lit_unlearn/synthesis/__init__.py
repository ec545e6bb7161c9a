"""Gradient-synthesis rules: combine the forget and retain gradients into one update.

>>> from lit_unlearn.synthesis import SAGO
>>> rule = SAGO(forget_weight=1.0, retain_weight=0.5)   # γ, α of the paper
"""

from lit_unlearn.synthesis.base import (
    AllReduceSum,
    Granularity,
    Reducer,
    RetainGuarantee,
    Synthesizer,
    local_sum,
)
from lit_unlearn.synthesis.baselines import BLUR, GRU
from lit_unlearn.synthesis.diagnostics import (
    GEOMETRY_KEYS,
    GeometryAccumulator,
    LayerGeometry,
    LayerGrid,
    layer_geometry,
    synthesis_diagnostics,
)
from lit_unlearn.synthesis.gating import SAGO, SAGOPreferRetain
from lit_unlearn.synthesis.projection import PCGrad, PCGradGlobal
from lit_unlearn.synthesis.torchjd_bridge import TorchJD
from lit_unlearn.synthesis.weighted import WeightedSum

__all__ = [
    "AllReduceSum",
    "BLUR",
    "GEOMETRY_KEYS",
    "GRU",
    "GeometryAccumulator",
    "Granularity",
    "LayerGeometry",
    "LayerGrid",
    "PCGrad",
    "PCGradGlobal",
    "Reducer",
    "RetainGuarantee",
    "SAGO",
    "SAGOPreferRetain",
    "Synthesizer",
    "TorchJD",
    "WeightedSum",
    "layer_geometry",
    "local_sum",
    "synthesis_diagnostics",
]

RULES: tuple[type[Synthesizer], ...] = (
    WeightedSum,
    PCGrad,
    PCGradGlobal,
    SAGO,
    SAGOPreferRetain,
    BLUR,
    GRU,
)
"""Every exported rule, in the order tables print them."""
