"""Forget objectives: gradient ascent, NPO, SimNPO, IdkDPO, RMU, and the token-reweighted and
distillation losses WGA, SatImp, UNDIAL and CE-U. Descending each one forgets."""

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


class DPO(Objective):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) with a refusal as
    the preferred answer: IdkDPO, as in TOFU (Maini et al. 2024, arXiv 2401.06121).

    ``L_f = −(2/β) · mean log σ(β · [(S_ref(w) − S_θ(w)) − (S_ref(l) − S_θ(l))])`` with ``w`` the
    example's alternate answer (the batch's ``alternate``), ``l`` the forget answer and ``S`` the
    summed NLL of an answer; a mean over sequences. Sign: decreases as the model prefers the
    refusal to the forget answer more than the frozen reference did, so descending it lowers the
    forget answer's likelihood (and raises the refusal's). Needs alternates in the forget data
    (``QAPairs`` ``alternate`` fields or ``alternates_file``; the embedded benchmark has them).
    open-unlearning's setting: β = 0.1.

    Args:
        beta: inverse temperature β of the preference margin.
    """

    requires_reference = True
    needs_alternates = True
    unit = "sequence"

    def __init__(self, beta: float = 0.1) -> None:
        if not beta > 0:
            raise ValueError(f"DPO beta must be > 0, got {beta}")
        self.beta = beta

    def loss_terms(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Terms:
        alternate: Batch | None = batch.get("alternate")  # type: ignore[assignment]  # a nested batch
        if alternate is None:
            raise RuntimeError("DPO needs forget batches with an 'alternate' sub-batch (alternate answers)")
        rejected, _ = Fn.sequence_nll(model(**model_inputs(batch)).logits, batch["labels"])
        chosen, _ = Fn.sequence_nll(model(**model_inputs(alternate)).logits, alternate["labels"])
        ref_rejected, _ = Fn.sequence_nll(reference_forward(reference, batch, "DPO").logits, batch["labels"])
        ref_chosen, _ = Fn.sequence_nll(
            reference_forward(reference, alternate, "DPO").logits, alternate["labels"]
        )
        total, count = Fn.dpo_terms(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        # log π_θ − log π_ref per sequence, of the forget answer and of the refusal
        metrics = {
            "log_ratio": (ref_rejected - rejected).detach().sum(),
            "alternate_log_ratio": (ref_chosen - chosen).detach().sum(),
        }
        return total, count, metrics


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


class WGA(Objective):
    """Weighted gradient ascent (Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A
    Gradient Perspective and Go Beyond", arXiv 2502.19301).

    ``L_f = −mean over label tokens of p_t^β · CE_t`` with ``p_t`` the model's probability of the
    label token, the weight detached: gradient ascent that eases off the tokens already
    forgotten, so it stops pushing their likelihood to zero. Sign: descending it raises the
    forget NLL. open-unlearning's setting: β = 1.

    Args:
        beta: exponent β of the token weight ``p_t^β`` (0: plain gradient ascent).
    """

    def __init__(self, beta: float = 1.0) -> None:
        if not beta >= 0:
            raise ValueError(f"WGA beta must be >= 0, got {beta}")
        self.beta = beta

    def loss_terms(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Terms:
        return Fn.wga_terms(model(**model_inputs(batch)).logits, batch["labels"], self.beta)


class SatImp(Objective):
    """SatImp (Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
    Unlearning", ICML 2025): gradient ascent with token weights ``p_t^β1 · (1 − p_t)^β2``.

    ``L_f = −mean over label tokens of w_t · CE_t``, the weight detached: tokens already forgotten
    and tokens the model is saturated on both weigh little, the uncertain middle most. Sign:
    descending it raises the forget NLL. open-unlearning's setting: β1 = 5, β2 = 1.

    Args:
        beta1: exponent of ``p_t`` (importance of tokens the model still knows).
        beta2: exponent of ``1 − p_t`` (down-weights saturated tokens).
    """

    def __init__(self, beta1: float = 5.0, beta2: float = 1.0) -> None:
        if not (beta1 >= 0 and beta2 >= 0):
            raise ValueError(f"SatImp beta1 and beta2 must be >= 0, got {beta1} and {beta2}")
        self.beta1, self.beta2 = beta1, beta2

    def loss_terms(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Terms:
        logits = model(**model_inputs(batch)).logits
        return Fn.satimp_terms(logits, batch["labels"], self.beta1, self.beta2)


class UNDIAL(Objective):
    """UNDIAL (Dong et al. 2024, "Self-Distillation with Adjusted Logits for Robust Unlearning in
    Large Language Models", arXiv 2402.10052): self-distillation towards the frozen reference's
    distribution with the label token's logit lowered by β.

    ``L_f = mean over label positions of CE(softmax(z_ref − β · onehot(y_t)), π_θ(·|x_<t))``. The
    target never moves (the reference is frozen), so the loss is bounded and forgetting stops
    where the target puts the label. Only label positions count: open-unlearning averages over
    every position, including padding and prompt positions whose label −100 then indexes the
    vocabulary from its end (a silent error this class does not reproduce). Sign: descending it
    lowers the label's probability towards the adjusted target. open-unlearning's setting: β =
    10 (the paper searches 3, 10, 30).

    Args:
        beta: how far the label's logit is lowered in the target.
    """

    requires_reference = True

    def __init__(self, beta: float = 10.0) -> None:
        if not beta > 0:
            raise ValueError(f"UNDIAL beta must be > 0, got {beta}")
        self.beta = beta

    def loss_terms(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Terms:
        ref_logits = reference_forward(reference, batch, "UNDIAL").logits
        return Fn.undial_terms(model(**model_inputs(batch)).logits, ref_logits, batch["labels"], self.beta)


class CEU(Objective):
    """CE-U, cross-entropy unlearning (Yang 2025, arXiv 2503.01224): cross-entropy of the model
    against its own current distribution with the label token removed.

    ``L_f = mean over label positions of CE(softmax(z with z_y = −∞), π_θ(·|x_<t))``, the target
    detached: it moves the label's probability to the other tokens in proportion to what the
    model already gives them, with a gradient that vanishes as the label's probability does (no
    reference model). The first answer tokens are skipped (the paper's footnote: they carry
    the format, not the fact). Sign: descending it lowers the label's probability.

    Args:
        ignore_first_n_answer_tokens: label tokens at the start of each answer left out of the loss.
    """

    def __init__(self, ignore_first_n_answer_tokens: int = 1) -> None:
        if ignore_first_n_answer_tokens < 0:
            raise ValueError(f"ignore_first_n_answer_tokens must be >= 0, got {ignore_first_n_answer_tokens}")
        self.ignore_first_n_answer_tokens = ignore_first_n_answer_tokens

    def loss_terms(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Terms:
        labels = Fn.drop_first_label_tokens(batch["labels"], self.ignore_first_n_answer_tokens)
        return Fn.ceu_terms(model(**model_inputs(batch)).logits, labels)
