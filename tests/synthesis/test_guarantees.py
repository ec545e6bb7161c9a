"""Every rule's declared guarantee (``retain_guarantee``), checked on random inputs for every rule
that declares one — the shipped rules and the example rule from outside the package alike.

``element`` (``u_i · g_r,i ≥ 0`` everywhere) implies ``tensor`` (``⟨u^j, g_r^j⟩ ≥ 0`` per tensor),
which implies ``global`` (``⟨u, g_r⟩ ≥ 0``): a rule is checked at its level and every weaker one.
"""

from __future__ import annotations

import pytest
import torch

from lit_unlearn.synthesis import RULES, Synthesizer
from tests.examples.new_rule import CappedConflict
from tests.synthesis.test_properties import make_grads

SEEDS = range(25)
SCALES = [1e-3, 1.0, 1e4]  # ||g_r^j||^2 >> eps (PCGrad's eps regime has its own test)
WEIGHTS = [(1.0, 1.0), (0.1, 1.0), (1.0, 0.1), (2.5, 0.5)]
LEVELS = ("element", "tensor", "global")
DECLARING = [cls for cls in (*RULES, CappedConflict) if cls.retain_guarantee is not None]


def levels_implied(rule: type[Synthesizer]) -> tuple[str, ...]:
    assert rule.retain_guarantee in LEVELS
    return LEVELS[LEVELS.index(rule.retain_guarantee) :]


def conflicting_grads(seed: int, scale: float):
    """Random gradients, half of the seeds pushed towards ``-g_r`` so that dot products are
    often negative (the case every guarantee is about)."""
    forget, retain = make_grads(seed, scale, zero_frac=0.1)
    if seed % 2:
        forget = [f - 1.5 * r for f, r in zip(forget, retain)]
    return forget, retain


def test_the_shipped_rules_declare_what_the_docs_promise():
    declared = {cls.__name__: cls.retain_guarantee for cls in RULES}
    assert declared == {
        "WeightedSum": None,
        "PCGrad": "tensor",
        "PCGradGlobal": "global",
        "SAGO": "element",
        "SAGOPreferRetain": "element",
        "BLUR": None,  # forget-first: see the counter-example below
        "GRU": None,  # protects the moving average, not the current g_r
    }


@pytest.mark.parametrize("rule_cls", DECLARING, ids=lambda c: c.__name__)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("gamma", "alpha"), WEIGHTS)
def test_update_never_opposes_retain_where_the_rule_says(rule_cls, seed, scale, gamma, alpha):
    forget, retain = conflicting_grads(seed, scale)
    update = rule_cls(forget_weight=gamma, retain_weight=alpha)(forget, retain)
    levels = levels_implied(rule_cls)
    if "element" in levels:  # signs, not products: tiny values would underflow
        for u, r in zip(update, retain):
            assert (torch.sign(u) * torch.sign(r) >= 0).all()
    if "tensor" in levels:
        for u, r in zip(update, retain):
            u64, r64 = u.reshape(-1).double(), r.reshape(-1).double()
            assert torch.dot(u64, r64) >= -1e-5 * u64.norm() * r64.norm()
    u_all = torch.cat([u.reshape(-1).double() for u in update])
    r_all = torch.cat([r.reshape(-1).double() for r in retain])
    assert torch.dot(u_all, r_all) >= -1e-5 * u_all.norm() * r_all.norm()


@pytest.mark.parametrize("rule_cls", [c for c in DECLARING if c.retain_guarantee == "element"])
def test_element_guarantee_survives_underflow(rule_cls):
    forget, retain = make_grads(3, 1e-30, zero_frac=0.1)
    for u, r in zip(rule_cls(forget_weight=1.0, retain_weight=0.5)(forget, retain), retain):
        assert (torch.sign(u) * torch.sign(r) >= 0).all()


def test_a_rule_that_declares_nothing_is_not_checked_for_it():
    from lit_unlearn.synthesis import WeightedSum

    forget, retain = [torch.tensor([-3.0])], [torch.tensor([1.0])]
    (u,) = WeightedSum()(forget, retain)
    assert float(u * retain[0]) < 0  # the naive sum can oppose the retain gradient
    assert WeightedSum not in DECLARING
