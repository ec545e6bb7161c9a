"""Retain objectives: NLL, KL to the reference, EMBED_DIFF (RMU's activation matching)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from lit_unlearn.objectives import functional as Fn
from lit_unlearn.objectives.base import (
    Batch,
    Objective,
    capture_layer_output,
    model_inputs,
    reference_forward,
)


class NLL(Objective):
    """Next-token NLL on the retain data ("GD"; the default retain loss). ``L_r = NLL(x_r)``, a
    mean over label tokens."""

    def loss_terms(
        self, model: nn.Module, batch: Batch, reference: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        return Fn.nll_terms(model(**model_inputs(batch)).logits, batch["labels"])

    def uniform_loss(self, model: nn.Module) -> float | None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        return math.log(vocab) if vocab else None


class KL(Objective):
    """KL divergence to the frozen reference on retain data: ``KL(π_ref(·|x_r) ‖ π_θ(·|x_r))``,
    averaged over label tokens. Zero at the start of unlearning; rises as the model drifts.
    """

    requires_reference = True

    def loss_terms(
        self, model: nn.Module, batch: Batch, reference: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        ref_logits = reference_forward(reference, batch, "KL").logits
        return Fn.kl_terms(model(**model_inputs(batch)).logits, ref_logits, batch["labels"])


class EmbedDiff(Objective):
    """RMU's retain loss: ``MSE(h_L(x_r), h_L^ref(x_r))`` over label tokens at decoder layer ``L``.

    Args:
        layer: decoder layer index (use the same as :class:`~lit_unlearn.objectives.forget.RMU`).
    """

    requires_reference = True

    def __init__(self, layer: int = 7) -> None:
        self.layer = layer

    def loss_terms(
        self, model: nn.Module, batch: Batch, reference: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        if reference is None:
            raise RuntimeError("EmbedDiff needs the frozen reference model, but none was built")
        with capture_layer_output(reference, self.layer) as ref_store:
            reference_forward(reference, batch, "EmbedDiff")
        with capture_layer_output(model, self.layer) as store:
            model(**model_inputs(batch))
        return Fn.mse_terms(store["hidden"], ref_store["hidden"], batch["labels"])
