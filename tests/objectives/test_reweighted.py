"""WGA, SatImp, UNDIAL and CE-U: values by hand, gradients against finite differences of the
documented formula (detached weights and targets held fixed), bf16 against fp32 and exact
effective-batch normalisation with variable-length answers (their signs: test_objectives.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_unlearn.objectives import CEU, UNDIAL, WGA, SatImp
from lit_unlearn.objectives import functional as Fn
from lit_unlearn.synthesis import SAGO
from tests.engine.test_module import _accumulation_pair
from tests.engine_helpers import make_model, relative_difference, weights

P = torch.tensor([[[0.5, 0.25, 0.25], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]]])
LOGITS = torch.log(P).double()
LABELS = torch.tensor([[-100, 0, 0, 2]])  # positions 0, 1, 2 predict labels 0, 0, 2: p = .5, .8, .5


def test_wga_and_satimp_weight_each_token_by_its_probability():
    ce = [-math.log(0.5), -math.log(0.8), -math.log(0.5)]
    p = [0.5, 0.8, 0.5]
    total, n = Fn.wga_terms(LOGITS, LABELS, beta=2.0)
    assert int(n) == 3 and total.item() == pytest.approx(-sum(q**2 * c for q, c in zip(p, ce)))
    total, n = Fn.satimp_terms(LOGITS, LABELS, beta1=5.0, beta2=1.0)
    assert total.item() == pytest.approx(-sum(q**5 * (1 - q) * c for q, c in zip(p, ce)))
    # β = 0 is gradient ascent
    assert Fn.wga_terms(LOGITS, LABELS, 0.0)[0].item() == pytest.approx(
        -Fn.nll_terms(LOGITS, LABELS)[0].item()
    )


def test_undial_targets_the_reference_with_the_label_logit_lowered():
    # reference logits (0, ln 2, 0) at a position with label 1, lowered by β = ln 2: a uniform target
    ref = torch.zeros(1, 2, 3, dtype=torch.float64)
    ref[0, 0, 1] = math.log(2.0)
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])).double()
    total, n = Fn.undial_terms(logits, ref, torch.tensor([[-100, 1]]), beta=math.log(2.0))
    assert int(n) == 1
    assert total.item() == pytest.approx(-(math.log(0.5) + 2 * math.log(0.25)) / 3)


def test_undial_counts_label_positions_only():
    """Padding and prompt positions change nothing (open-unlearning averages them in, with the
    label −100 indexing the vocabulary from its end)."""
    gen = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 5]])
    total, n = Fn.undial_terms(logits, ref, labels, beta=3.0)
    assert int(n) == 6
    per_row = [
        Fn.undial_terms(logits[i : i + 1], ref[i : i + 1], labels[i : i + 1], 3.0)[0] for i in range(2)
    ]
    assert total.item() == pytest.approx(sum(t.item() for t in per_row))
    scrambled = logits.clone()
    scrambled[0, 3:] = 100.0  # positions whose next label is -100 (and the last one)
    assert Fn.undial_terms(scrambled, ref, labels, beta=3.0)[0].item() == pytest.approx(total.item())


def test_ceu_moves_the_label_mass_to_the_other_tokens_in_proportion():
    # p = (.5, .25, .25) with label 0: the target is (0, .5, .5)
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1.0, 1.0, 1.0]]])).double()
    total, n = Fn.ceu_terms(logits, torch.tensor([[-100, 0]]))
    assert int(n) == 1 and total.item() == pytest.approx(math.log(4.0))


def test_the_first_answer_tokens_can_be_left_out():
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, -100]])
    assert Fn.drop_first_label_tokens(labels, 1).tolist() == [[-100, -100, 6, 7], [-100, -100, -100, -100]]
    assert Fn.drop_first_label_tokens(labels, 0) is labels


def _surrogates(z0: torch.Tensor, labels: torch.Tensor):
    """Each loss with what it detaches frozen at ``z0``: their gradient is what the objectives'
    autograd gradient must be."""
    logits0, targets, mask = Fn._label_positions(z0, labels)
    p0 = torch.softmax(logits0, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def weighted(weight):
        def f(z):
            logp = torch.log_softmax(z[:, :-1], -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            return (weight * logp * mask).sum()  # −Σ w · CE

        return f

    ceu_target = torch.softmax(logits0.scatter(-1, targets.unsqueeze(-1), float("-inf")), -1)

    def ceu(z):
        return -(ceu_target * torch.log_softmax(z[:, :-1], -1)).sum(-1).mul(mask).sum()

    return {
        "wga": (lambda z: Fn.wga_terms(z, labels, 1.5)[0], weighted(p0**1.5)),
        "satimp": (lambda z: Fn.satimp_terms(z, labels, 5.0, 1.0)[0], weighted(p0**5 * (1 - p0))),
        "ceu": (lambda z: Fn.ceu_terms(z, labels)[0], ceu),
    }


@pytest.mark.parametrize("name", ["wga", "satimp", "ceu"])
def test_gradients_match_finite_differences_of_the_formula(name):
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 0, 5, 4]])
    loss, surrogate = _surrogates(z0, labels)[name]
    z = z0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(z), z)
    h, numeric = 1e-6, torch.zeros_like(z0)
    for idx in range(z0.numel()):
        step = torch.zeros(z0.numel(), dtype=z0.dtype)
        step[idx] = h
        step = step.view_as(z0)
        numeric.view(-1)[idx] = (surrogate(z0 + step) - surrogate(z0 - step)) / (2 * h)
    assert torch.allclose(grad, numeric, atol=1e-7), (grad - numeric).abs().max()
    assert grad.abs().sum() > 0


def test_undial_passes_gradcheck():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 0, -100, 4]])
    assert torch.autograd.gradcheck(lambda x: Fn.undial_terms(x, ref, labels, 3.0)[0], (z,))


@pytest.mark.parametrize(
    "terms",
    [
        lambda z, r, y: Fn.wga_terms(z, y, 1.0),
        lambda z, r, y: Fn.satimp_terms(z, y, 5.0, 1.0),
        lambda z, r, y: Fn.undial_terms(z, r, y, 10.0),
        lambda z, r, y: Fn.ceu_terms(z, y),
    ],
    ids=["wga", "satimp", "undial", "ceu"],
)
def test_bf16_logits_give_the_fp32_value_within_rounding(terms):
    gen = torch.Generator().manual_seed(3)
    z, r = torch.randn(4, 12, 50, generator=gen), torch.randn(4, 12, 50, generator=gen)
    labels = torch.randint(0, 50, (4, 12), generator=gen)
    labels[:, :3] = -100
    full, n32 = terms(z, r, labels)
    half, n16 = terms(z.bfloat16(), r.bfloat16(), labels)
    assert half.dtype == torch.float32 and int(n16) == int(n32)  # reduced in float32
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


OBJECTIVES = [WGA(), SatImp(), UNDIAL(), CEU()]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: type(o).__name__)
def test_two_micro_batches_of_two_equal_one_batch_of_four(synthetic_tokenizer_dir, varlen, objective):
    """Answers of 1–18 words: token units summed over micro-batches and divided once."""
    micro, big = _accumulation_pair(synthetic_tokenizer_dir, varlen, SAGO(retain_weight=0.5), objective)
    assert relative_difference(micro, big, weights(make_model(synthetic_tokenizer_dir))) <= 1e-6


def test_settings_are_validated():
    for make in (
        lambda: WGA(beta=-1.0),
        lambda: SatImp(beta2=-1.0),
        lambda: UNDIAL(beta=0.0),
        lambda: CEU(-1),
    ):
        with pytest.raises(ValueError):
            make()
