"""The engine: Algorithm 1 (``module``), its gradient buffers, model set-up, state and outcome."""

from lit_unlearn.engine.model_setup import ModelSetup
from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.engine.outcome import Engine, StepOutcome
from lit_unlearn.engine.state import EngineState

__all__ = ["Engine", "EngineState", "ModelSetup", "StepOutcome", "UnlearningModule"]
