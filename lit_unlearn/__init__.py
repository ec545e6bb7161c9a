"""lit_unlearn: LLM unlearning as an asymmetric two-task problem, on PyTorch Lightning."""

from lit_unlearn.rundir import RunLogger

__all__ = ["RunLogger"]
