"""Forget objectives: gradient ascent, NPO, SimNPO, RMU. Descending each one forgets."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lit_unlearn.objectives import functional as Fn
from lit_unlearn.objectives.base import (
    Batch,
    Objective,
    Terms,
    capture_layer_output,
    model_inputs,
    reference_forward,
)
from lit_unlearn.objectives.functional import at_least_fp32


class GradientAscent(Objective):
    """Gradient ascent on the forget data (GA; with an NLL retain loss this is GradDiff / "GA+GD").

    ``L_f = −NLL(x_f)`` (a mean over label tokens). Sign: descending ``L_f`` raises the forget NLL.
    """

    def loss_terms(
        self, model: nn.Module, batch: Batch, reference: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        total, count = Fn.nll_terms(model(**model_inputs(batch)).logits, batch["labels"])
        return -total, count


class NPO(Objective):
    """Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868).

    ``L_f = −(2/β) · mean log σ(β · (S_θ(x_f) − S_ref(x_f)))`` with ``S`` the per-sequence summed
    NLL; a mean over sequences. Sign: decreases as the model's likelihood of the forget text falls
    below the reference's.

    Args:
        beta: inverse temperature β (paper WMDP settings: 1e-4 to 1e-2; synthetic: 0.1).
        precompute_reference: compute ``S_ref`` for every forget example once at fit start and
            keep only those numbers (saved in checkpoints), so no reference model stays in memory.
            Valid because the forget set is static.
    """

    def __init__(self, beta: float = 0.1, precompute_reference: bool = False) -> None:
        if not beta > 0:
            raise ValueError(f"NPO beta must be > 0, got {beta}")
        self.beta = beta
        self.precompute_reference = precompute_reference
        self._ref_table: Tensor | None = None

    unit = "sequence"

    @property
    def requires_reference(self) -> bool:  # type: ignore[override]
        return not self.precompute_reference

    def prepare(self, model: nn.Module, forget_batches: Iterable[Batch] | None) -> None:
        if not self.precompute_reference or self._ref_table is not None:
            return
        if forget_batches is None:
            raise RuntimeError("NPO(precompute_reference=True) needs the forget examples at fit start")
        values = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in forget_batches:
                seq, _ = Fn.sequence_nll(model(**model_inputs(batch)).logits, batch["labels"])
                values.append(seq)
        model.train(was_training)
        self._ref_table = at_least_fp32(torch.cat(values))

    def loss_terms(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Terms:
        seq, _ = Fn.sequence_nll(model(**model_inputs(batch)).logits, batch["labels"])
        if self.precompute_reference:
            if self._ref_table is None or "index" not in batch:
                raise RuntimeError(
                    "NPO precomputed reference is missing (prepare() not run or batch without 'index')"
                )
            ref = self._ref_table.to(seq.device)[batch["index"]]
        else:
            ref, _ = Fn.sequence_nll(reference_forward(reference, batch, "NPO").logits, batch["labels"])
        total, count = Fn.npo_terms(seq, ref, self.beta)
        # log π_θ(x) − log π_ref(x) per sequence: how far below the reference the forget text has fallen
        return total, count, {"log_ratio": (ref - seq).detach().sum()}

    def state_dict(self) -> dict[str, Any]:
        return {"ref_table": self._ref_table.cpu()} if self._ref_table is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ref_table" in state:
            self._ref_table = state["ref_table"]


class SimNPO(Objective):
    """SimNPO (Fan et al. 2024, arXiv 2410.07163): reference-free, length-normalised NPO.

    ``L_f = −(2/β) · mean log σ(β · (S_θ(x_f)/|y| − δ))``, a mean over sequences. Sign: decreases
    as the forget NLL rises.

    Args:
        beta: inverse temperature β (paper: 0.02-1.0; synthetic: 2.5).
        delta: reward margin δ (paper: 0.1).
    """

    def __init__(self, beta: float = 2.5, delta: float = 0.0) -> None:
        if not beta > 0:
            raise ValueError(f"SimNPO beta must be > 0, got {beta}")
        self.beta, self.delta = beta, delta

    unit = "sequence"

    def loss_terms(
        self, model: nn.Module, batch: Batch, reference: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        seq, n = Fn.sequence_nll(model(**model_inputs(batch)).logits, batch["labels"])
        return Fn.simnpo_terms(seq, n, self.beta, self.delta)


class RMU(Objective):
    """Representation Misdirection for Unlearning (Li et al. 2024, WMDP, arXiv 2403.03218).

    ``L_f = mean over label tokens of MSE(h_L(x_f), c · v)`` with ``v`` a fixed random unit vector
    and ``h_L`` the output of decoder layer ``L``. Sign: pushing activations towards a random
    direction destroys what the later layers read, so the forget NLL rises. Pair it with
    :class:`~lit_unlearn.objectives.retain.EmbedDiff` and a trainable-parameter regex (paper
    settings: layer 7, c = 2, only ``layers.5-7.mlp.down_proj`` trained, lr 5e-5, 80 steps).

    Args:
        layer: index of the decoder layer whose output is steered (paper: 7).
        steering_coeff: c, the norm of the target activation (paper: 2 for the listed runs).
        seed: seed of the random direction ``v`` (uniform in [0, 1)^d, normalised, as in WMDP).
    """

    def __init__(self, layer: int = 7, steering_coeff: float = 2.0, seed: int = 0) -> None:
        self.layer, self.steering_coeff, self.seed = layer, steering_coeff, seed
        self._direction: Tensor | None = None

    def setup(self, model: nn.Module) -> None:
        config: Any = model.config
        hidden = int(config.hidden_size)
        gen = torch.Generator().manual_seed(self.seed)
        v = torch.rand(hidden, generator=gen)
        self._direction = v / v.norm()

    def loss_terms(
        self, model: nn.Module, batch: Batch, reference: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        if self._direction is None:
            self.setup(model)
        assert self._direction is not None
        with capture_layer_output(model, self.layer) as store:
            model(**model_inputs(batch))
        hidden = store["hidden"]
        target = (self.steering_coeff * self._direction).to(hidden.device).expand_as(hidden)
        return Fn.mse_terms(hidden, target, batch["labels"])

    def state_dict(self) -> dict[str, Any]:
        return {"direction": self._direction.cpu()} if self._direction is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "direction" in state:
            self._direction = state["direction"]
