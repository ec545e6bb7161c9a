"""A user's extension, outside the package: one synthesizer and one objective.

This is the whole of the code CONTRIBUTING.md asks for (no file of lit_unlearn changes);
``tests/test_extension.py`` runs it through the real ``lit-unlearn fit``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from lit_unlearn.objectives import Objective
from lit_unlearn.objectives.base import Batch, Terms, model_inputs
from lit_unlearn.objectives.functional import per_token_nll
from lit_unlearn.synthesis import Synthesizer
from lit_unlearn.synthesis.base import Granularity


class BoundedForget(Synthesizer):
    """``u = α g_r + γ clamp(g_f, −|g_r|, |g_r|)``: per coordinate, the forget gradient may not
    be larger than the retain gradient (element-wise; the retain gradient always leads).

    >>> import torch
    >>> BoundedForget()([torch.tensor([3.0, -1.0, 0.5])], [torch.tensor([1.0, 2.0, -2.0])])[0]
    tensor([2.0000, 1.0000, -1.5000])

    Args:
        forget_weight: γ.
        retain_weight: α.
    """

    granularity: ClassVar[Granularity] = "element"

    def combine(self, forget: Tensor, retain: Tensor, stats: Any = None) -> Tensor:
        bound = retain.abs()
        return self.retain_weight * retain + self.forget_weight * forget.clamp(-bound, bound)


class KnownTokenAscent(Objective):
    """Gradient ascent on the forget tokens the model still predicts well (NLL below ``threshold``);
    reports the share of tokens it kept as the metric ``kept``.

    Args:
        threshold: tokens with a higher NLL count as forgotten and get no gradient.
    """

    def __init__(self, threshold: float = 2.0) -> None:
        self.threshold = threshold

    def loss_terms(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Terms:
        nll, mask = per_token_nll(model(**model_inputs(batch)).logits, batch["labels"])
        keep = mask & (nll.detach() < self.threshold)
        return -(nll * keep).sum(), mask.sum(), {"kept": keep.sum().double()}
