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
