"""Pure tensor maths of the objectives. Reductions run in float32 or wider.

Conventions: ``labels`` are aligned with ``input_ids`` (``-100`` = no loss) and shifted here, so
position ``t`` predicts label ``t + 1``, exactly as Hugging Face causal LMs do.

Every objective comes in two forms: ``*_terms`` returns ``(total, count)`` — the *sum* of the
per-unit losses of a micro-batch and the number of units (label tokens or sequences) — and the
plain form returns ``total / count``. The engine uses the terms so it can divide by the number
of units of the whole effective batch (all micro-batches, all ranks) instead of averaging
per-micro-batch means, which is only equal when every micro-batch has the same number of units.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half-precision values to float32; leave float32/float64 alone."""
    return x.float() if torch.finfo(x.dtype).bits < 32 else x


def per_token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token NLL per position (float32, zero where masked) and the label mask, both ``(B, T-1)``."""
    logits = at_least_fp32(logits[:, :-1])
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape), mask


def sequence_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``S(x)``: per-sequence *sum* of token NLL, and ``|y|``: label tokens per sequence."""
    nll, mask = per_token_nll(logits, labels)
    return nll.sum(1), mask.sum(1)


def _mean(terms: tuple[Tensor, Tensor]) -> Tensor:
    total, count = terms
    return total / count.clamp_min(1)


def nll_terms(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed token NLL over the label tokens of the batch, and the number of label tokens."""
    nll, mask = per_token_nll(logits, labels)
    return nll.sum(), mask.sum()


def mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """``NLL(x)``: token-mean NLL over all label tokens of the batch."""
    return _mean(nll_terms(logits, labels))


def npo_terms(seq_nll: Tensor, ref_seq_nll: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``-(2/β) · Σ log σ(β · (S_θ − S_ref))`` over the sequences, and the number of sequences."""
    per_seq = -(2.0 / beta) * F.logsigmoid(beta * (seq_nll - ref_seq_nll))
    return per_seq.sum(), torch.tensor(per_seq.numel(), device=per_seq.device)


def npo_loss(seq_nll: Tensor, ref_seq_nll: Tensor, beta: float) -> Tensor:
    """``-(2/β) · mean log σ(β · (S_θ − S_ref))``; falls as the model's likelihood drops below the reference's.

    >>> round(npo_loss(torch.tensor([5.0]), torch.tensor([5.0]), beta=0.1).item(), 4)  # 2/β · log 2
    13.8629
    """
    return _mean(npo_terms(seq_nll, ref_seq_nll, beta))


def dpo_terms(
    chosen_seq_nll: Tensor,
    rejected_seq_nll: Tensor,
    ref_chosen_seq_nll: Tensor,
    ref_rejected_seq_nll: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """DPO with the alternate answer as the winner ``w`` and the forget answer as the loser ``l``:
    ``−(2/β) · Σ log σ(β · [(S_ref(w) − S_θ(w)) − (S_ref(l) − S_θ(l))])`` over the sequences (``S``
    the summed NLL, so ``S_ref − S_θ = log π_θ − log π_ref``), and the number of sequences.

    >>> s = torch.tensor([4.0])
    >>> total, n = dpo_terms(s, s, s, s, beta=0.1)  # equal margins: (2/β) · ln 2
    >>> round(total.item(), 4), int(n)
    (13.8629, 1)
    """
    margin = (ref_chosen_seq_nll - chosen_seq_nll) - (ref_rejected_seq_nll - rejected_seq_nll)
    per_seq = -(2.0 / beta) * F.logsigmoid(beta * margin)
    return per_seq.sum(), torch.tensor(per_seq.numel(), device=per_seq.device)


def simnpo_terms(seq_nll: Tensor, n_tokens: Tensor, beta: float, delta: float) -> tuple[Tensor, Tensor]:
    """``-(2/β) · Σ log σ(β · (S_θ/|y| − δ))`` over the sequences, and the number of sequences."""
    per_seq = -(2.0 / beta) * F.logsigmoid(beta * (seq_nll / n_tokens.clamp_min(1) - delta))
    return per_seq.sum(), torch.tensor(per_seq.numel(), device=per_seq.device)


def simnpo_loss(seq_nll: Tensor, n_tokens: Tensor, beta: float, delta: float) -> Tensor:
    """``-(2/β) · mean log σ(β · (S_θ/|y| − δ))``: reference-free, length-normalised NPO."""
    return _mean(simnpo_terms(seq_nll, n_tokens, beta, delta))


def kl_terms(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``KL(π_ref ‖ π_θ)`` summed over label positions, and the number of label positions."""
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = F.log_softmax(at_least_fp32(logits[:, :-1]), dim=-1)
    ref_logp = F.log_softmax(at_least_fp32(ref_logits[:, :-1]), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (kl * mask).sum(), mask.sum()


def kl_to_reference(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> Tensor:
    """``KL(π_ref ‖ π_θ)`` per predicted position, averaged over label tokens."""
    return _mean(kl_terms(logits, ref_logits, labels))


def mse_terms(hidden: Tensor, target: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token mean squared error between activations, summed over label tokens; and their number."""
    mask = (labels != IGNORE_INDEX).unsqueeze(-1)
    err = (at_least_fp32(hidden) - at_least_fp32(target)).pow(2).mean(-1, keepdim=True)
    return (err * mask).sum(), mask.sum()


def masked_mse(hidden: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    """Mean over label tokens of the per-token mean squared error between activations."""
    return _mean(mse_terms(hidden, target, labels))


def _weighted_ascent_terms(
    logits: Tensor, labels: Tensor, weight_of_p: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """``−Σ w_t · CE_t`` over label tokens with ``w_t = weight_of_p(p_t)`` detached (``p_t`` the
    model's probability of the label), and the number of label tokens."""
    nll, mask = per_token_nll(logits, labels)
    weight = weight_of_p(torch.exp(-nll.detach()))
    return -(weight * nll * mask).sum(), mask.sum()


def wga_terms(logits: Tensor, labels: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Weighted gradient ascent: ``−Σ p_t^β · CE_t`` over label tokens (weights detached), and
    the number of label tokens. Tokens the model already doubts (small ``p_t``) weigh little.

    >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    >>> total, n = wga_terms(logits, torch.tensor([[-100, 0]]), beta=1.0)  # -0.5 * ln 2
    >>> round(total.item(), 4), int(n)
    (-0.3466, 1)
    """
    return _weighted_ascent_terms(logits, labels, lambda p: p.pow(beta))


def satimp_terms(logits: Tensor, labels: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """SatImp: ``−Σ p_t^β1 (1 − p_t)^β2 · CE_t`` over label tokens (weights detached), and the
    number of label tokens: tokens already forgotten (small ``p_t``) and tokens the model is
    saturated on (``p_t`` near 1) both weigh little."""
    return _weighted_ascent_terms(logits, labels, lambda p: p.pow(beta1) * (1.0 - p).pow(beta2))


def _label_positions(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted ``(logits[:, :-1], targets, mask)``; masked targets replaced by 0 so they can index."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return at_least_fp32(logits[:, :-1]), targets.masked_fill(~mask, 0), mask


def _soft_ce_terms(logits: Tensor, target_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``−Σ_v softmax(target)_v · log softmax(logits)_v`` summed over the masked positions (the
    target detached), and their number."""
    target = torch.softmax(target_logits.detach(), dim=-1)
    ce = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    return (ce * mask).sum(), mask.sum()


def undial_terms(logits: Tensor, ref_logits: Tensor, labels: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """UNDIAL: cross-entropy of the model against ``softmax(ref_logits − β · onehot(label))`` — the
    reference's distribution with the label's logit lowered by β — summed over the label
    positions only, and their number."""
    logits, targets, mask = _label_positions(logits, labels)
    adjusted = at_least_fp32(ref_logits[:, :-1]).clone()
    adjusted.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(adjusted[..., :1], -beta))
    return _soft_ce_terms(logits, adjusted, mask)


def ceu_terms(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """CE-U: cross-entropy of the model against the softmax of its own (detached) logits with the
    label's logit set to −∞, summed over label positions, and their number: every other token
    keeps its relative probability, the label gets none."""
    logits, targets, mask = _label_positions(logits, labels)
    target = logits.detach().scatter(-1, targets.unsqueeze(-1), float("-inf"))
    return _soft_ce_terms(logits, target, mask)


def drop_first_label_tokens(labels: Tensor, n: int) -> Tensor:
    """``labels`` with the first ``n`` label tokens of every sequence set to −100 (no loss)."""
    if n <= 0:
        return labels
    is_label = labels != IGNORE_INDEX
    return labels.masked_fill(is_label & (is_label.cumsum(1) <= n), IGNORE_INDEX)
