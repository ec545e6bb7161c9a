"""Each rule's exact behaviour (docs/method.md) on random inputs, and hand-worked examples; the
guarantees each rule declares are checked for every rule in ``test_guarantees.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_unlearn.synthesis import (
    SAGO,
    PCGrad,
    PCGradGlobal,
    SAGOPreferRetain,
    WeightedSum,
    synthesis_diagnostics,
)
from tests.synthesis.test_properties import make_grads

SEEDS = range(25)
SCALES = [1e-3, 1.0, 1e4]  # ||g_r^j||^2 >> eps; the eps regime has its own test
WEIGHTS = [(1.0, 1.0), (0.1, 1.0), (1.0, 0.1), (2.5, 0.5)]


def flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def test_pcgrad_global_uses_one_coefficient_for_all_tensors():
    forget, retain = make_grads(1)
    forget = [f - 2 * r for f, r in zip(forget, retain)]
    update = PCGradGlobal()(forget, retain)
    f, r = flat(forget), flat(retain)
    c = torch.dot(f, r) / (torch.dot(r, r) + 1e-10)
    assert c < 0
    expected = r + (f - c * r)
    torch.testing.assert_close(flat(update), expected, rtol=1e-5, atol=1e-5)


def test_pcgrad_projects_only_conflicting_tensors_and_only_the_forget_gradient():
    r1, r2 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, -1.0])
    f1, f2 = torch.tensor([-3.0, 1.0, 1.0]), torch.tensor([2.0, 1.0])  # dot -1 (projected), +1 (kept)
    u1, u2 = PCGrad(forget_weight=1.0, retain_weight=0.5)([f1, f2], [r1, r2])
    c = -1.0 / 5.0
    torch.testing.assert_close(u1, 0.5 * r1 + (f1 - c * r1))
    torch.testing.assert_close(u2, 0.5 * r2 + f2)


@pytest.mark.parametrize("rule_cls", [PCGrad, PCGradGlobal])
def test_pcgrad_eps_makes_projection_partial_for_tiny_retain_norms(rule_cls):
    """<u, g_r> = α||g_r||² + γ<g_f, g_r>·ε/(||g_r||² + ε) exactly; with ε = 0 the guarantee is exact."""
    f, r = [torch.tensor([-2e-6], dtype=torch.float64)], [torch.tensor([1e-6], dtype=torch.float64)]
    u = rule_cls()(f, r)[0]
    sq, dot = 1e-12, -2e-12
    assert torch.dot(u, r[0]).item() == pytest.approx(sq + dot * 1e-10 / (sq + 1e-10), rel=1e-9)
    assert torch.dot(u, r[0]) < 0  # the reference ε undoes the guarantee at this scale
    assert torch.dot(rule_cls(eps=0.0)(f, r)[0], r[0]) >= 0


def test_pcgrad_zero_is_never_a_conflict_and_eps_guards_zero_retain():
    f, r = torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0])  # dot exactly 0
    assert torch.equal(PCGrad()([f], [r])[0], f + r)
    zero_r = torch.zeros(2)
    assert torch.equal(PCGrad()([f], [zero_r])[0], f)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("gamma", "alpha"), WEIGHTS)
def test_sago_is_exactly_retain_on_conflicts_and_forget_elsewhere(seed, gamma, alpha):
    forget, retain = make_grads(seed, zero_frac=0.2)
    update = SAGO(forget_weight=gamma, retain_weight=alpha)(forget, retain)
    for f, r, u in zip(forget, retain, update):
        conflict = ((f > 0) & (r < 0)) | ((f < 0) & (r > 0))
        assert torch.equal(u[conflict], alpha * r[conflict])
        assert torch.equal(u[~conflict], gamma * f[~conflict])


def test_sago_detects_conflicts_below_float_underflow():
    f, r = torch.tensor([1e-30, 1e-30]), torch.tensor([-1e-30, 1e-30])  # f*r underflows to -0.0
    u = SAGO(retain_weight=0.5)([f], [r])[0]
    assert torch.equal(u, torch.tensor([-0.5e-30, 1e-30]))


@pytest.mark.parametrize("seed", range(5))
def test_sago_prefer_retain_keeps_retain_everywhere(seed):
    forget, retain = make_grads(seed, zero_frac=0.2)
    update = SAGOPreferRetain(forget_weight=0.3, retain_weight=2.0)(forget, retain)
    for f, r, u in zip(forget, retain, update):
        conflict = (torch.sign(f) * torch.sign(r)) < 0
        assert torch.equal(u[conflict], 2.0 * r[conflict])
        torch.testing.assert_close(u[~conflict], 0.3 * f[~conflict] + 2.0 * r[~conflict])


def test_sum_equals_summed_loss():
    """WeightedSum of the two task gradients equals the gradient of γ L_f + α L_r."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    params = list(model.parameters())
    xf, yf = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    xr, yr = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    gamma, alpha = 0.7, 1.9
    loss_f = -F.cross_entropy(model(xf), yf)  # gradient ascent, as a forget loss is written
    loss_r = F.cross_entropy(model(xr), yr)
    g_f = torch.autograd.grad(loss_f, params)
    g_r = torch.autograd.grad(loss_r, params)
    total = torch.autograd.grad(
        gamma * -F.cross_entropy(model(xf), yf) + alpha * F.cross_entropy(model(xr), yr), params
    )
    update = WeightedSum(forget_weight=gamma, retain_weight=alpha)(g_f, g_r)
    for u, t in zip(update, total):
        torch.testing.assert_close(u, t, rtol=1e-12, atol=1e-12)


def test_sago_cosine_can_be_below_pcgrad_cosine():
    """The counter-example in docs/method.md: SAGO's guarantee is coordinate-wise, not a larger cosine."""
    f, r = [torch.tensor([-1.0, 0.1])], [torch.tensor([1.0, 1.0])]
    cos_pc = F.cosine_similarity(PCGrad()(f, r)[0], r[0], dim=0)
    cos_sago = F.cosine_similarity(SAGO()(f, r)[0], r[0], dim=0)
    assert cos_pc.item() == pytest.approx(0.876, abs=1e-3)
    assert cos_sago.item() == pytest.approx(0.774, abs=1e-3)
    assert cos_sago < cos_pc


def test_hand_worked_three_coordinate_examples():
    f, r = [torch.tensor([1.0, 3.0, 0.0])], [torch.tensor([-2.0, 2.0, -4.0])]
    # coordinate 0 conflicts; coordinate 2 has a zero forget entry (no conflict)
    assert SAGO(retain_weight=0.5)(f, r)[0].tolist() == [-1.0, 3.0, 0.0]
    assert SAGOPreferRetain(retain_weight=0.5)(f, r)[0].tolist() == [-1.0, 4.0, -2.0]
    assert WeightedSum(retain_weight=0.5)(f, r)[0].tolist() == [0.0, 4.0, -2.0]
    # <f, r> = -2 + 6 = 4 > 0: PCGrad leaves the forget gradient alone
    assert PCGrad(retain_weight=0.5)(f, r)[0].tolist() == [0.0, 4.0, -2.0]
    f2 = [torch.tensor([-2.0, 0.0, 1.0])]
    r2 = [torch.tensor([1.0, 1.0, 0.0])]  # <f, r> = -2, ||r||^2 = 2: f <- f + r = (-1, 1, 1)
    assert PCGrad()(f2, r2)[0].tolist() == [0.0, 2.0, 1.0]


def _shard(tensors, part):
    out = []
    for t in tensors:
        flat_t = t.reshape(-1)
        half = flat_t.numel() // 2
        out.append(flat_t[:half] if part == 0 else flat_t[half:])
    return out


@pytest.mark.parametrize("rule_cls", [PCGrad, PCGradGlobal])
def test_reducer_lets_sharded_rules_use_full_tensor_sums(rule_cls):
    """Two shards of every tensor, each reduced with the other's partial sums, equal the full rule."""
    forget, retain = make_grads(11)
    forget = [f - r for f, r in zip(forget, retain)]
    full = flat(rule_cls()(forget, retain))
    partials = {}

    def capture(part):
        def reducer(p):
            partials[part] = p.clone()
            return p

        return reducer

    for part in (0, 1):
        rule_cls().use_reducer(capture(part)).statistics(_shard(forget, part), _shard(retain, part))
    shards = []
    for part in (0, 1):
        other = partials[1 - part]
        calls = []

        def reducer(p, other=other, calls=calls):
            calls.append(1)
            return p + other

        shards.append(rule_cls().use_reducer(reducer)(_shard(forget, part), _shard(retain, part)))
        assert len(calls) == 1  # one collective per step, not one per tensor
    pieces = []
    for j in range(len(forget)):
        pieces += [shards[0][j].double(), shards[1][j].double()]
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-5, atol=1e-6)


def test_diagnostics_match_direct_computation():
    forget, retain = make_grads(12, zero_frac=0.3)
    rule = PCGrad()
    update = rule(forget, retain)
    geo = synthesis_diagnostics(forget, retain, update)
    f, r, u = flat(forget), flat(retain), flat(update)
    both = (f != 0) & (r != 0)
    expected = {
        "grad_cosine": F.cosine_similarity(f, r, dim=0),
        "update_retain_cosine": F.cosine_similarity(u, r, dim=0),
        "update_forget_cosine": F.cosine_similarity(u, f, dim=0),
        "forget_norm": f.norm(),
        "retain_norm": r.norm(),
        "update_norm": u.norm(),
        "conflict_fraction": ((f * r < 0) & both).sum() / both.sum(),
    }
    for key, value in expected.items():
        assert geo[key].dtype == torch.float32
        assert geo[key].item() == pytest.approx(value.item(), rel=1e-5), key
    dots = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(forget, retain)])
    projected = (dots < 0).float().mean()
    assert geo["tensor_conflict_fraction"].item() == pytest.approx(projected.item())
    assert rule.last_report["projected_fraction"].item() == pytest.approx(projected.item())


def test_diagnostics_of_zero_gradients_are_finite():
    z = [torch.zeros(3)]
    geo = synthesis_diagnostics(z, z, z)
    assert all(torch.isfinite(v) for v in geo.values())
    with pytest.raises(ValueError, match="one tensor per parameter"):
        synthesis_diagnostics(z, z, [])
