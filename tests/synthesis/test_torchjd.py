"""The TorchJD bridge against TorchJD's own aggregators on the stacked matrix, its refusals, the
per-tensor scope, the sharded reduction, and a stateful weighting (PCD) across a checkpoint."""

from __future__ import annotations

import io

import pytest
import torch

torchjd = pytest.importorskip("torchjd")  # the test extras install it: CI covers the bridge
from torchjd.aggregation import (  # noqa: E402
    IMTLG,
    MGDA,
    PCD,
    AlignedMTL,
    ConFIG,
    DualProj,
    GradDrop,
    UPGrad,
)

from lit_unlearn.synthesis import TorchJD  # noqa: E402
from tests.synthesis.test_guarantees import conflicting_grads  # noqa: E402

AGGREGATORS = [UPGrad, MGDA, DualProj, IMTLG, AlignedMTL, PCD]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def grads(seed: int):
    forget, retain = conflicting_grads(seed, 1.0)
    return [f.double() for f in forget], [r.double() for r in retain]


@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=lambda a: a.__name__)
@pytest.mark.parametrize("seed", range(3))
def test_the_bridge_equals_the_aggregator_on_the_stacked_matrix(aggregator, seed):
    forget, retain = grads(seed)
    alpha, gamma = 1.3, 0.7
    update = flat(TorchJD(aggregator(), forget_weight=gamma, retain_weight=alpha)(forget, retain))
    expected = aggregator()(torch.stack([alpha * flat(retain), gamma * flat(forget)]))
    # the Gramian's dot products are accumulated in float32: weights agree to ~1e-7
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-6 * expected.norm().item())


@pytest.mark.parametrize("aggregator", [UPGrad, MGDA], ids=lambda a: a.__name__)
def test_tensor_scope_weighs_each_tensor_by_its_own_gramian(aggregator):
    forget, retain = grads(4)
    update = TorchJD(aggregator(), scope="tensor")(forget, retain)
    for u, f, r in zip(update, forget, retain):
        expected = aggregator()(torch.stack([r.reshape(-1), f.reshape(-1)]))
        torch.testing.assert_close(u.reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_aggregators_that_need_the_matrix_are_refused_with_the_reason():
    for aggregator in (ConFIG(), GradDrop()):
        with pytest.raises(ValueError, match="needs the whole gradient matrix"):
            TorchJD(aggregator)
    with pytest.raises(ValueError, match="keeps a state across steps"):
        TorchJD(PCD(), scope="tensor")


def test_upgrad_never_opposes_the_retain_gradient():
    """UPGrad projects onto the dual cone of both rows: ``⟨u, g_r⟩ ≥ 0`` (and ``⟨u, g_f⟩ ≥ 0``)."""
    for seed in range(10):
        forget, retain = grads(seed)
        u = flat(TorchJD(UPGrad())(forget, retain))
        assert torch.dot(u, flat(retain)) >= -1e-6 * u.norm() * flat(retain).norm()


def test_sharded_sums_through_the_reducer_equal_whole_tensors():
    forget, retain = grads(1)
    whole = TorchJD(UPGrad())(forget, retain)
    halves = [[t.reshape(-1)[: t.numel() // 2] for t in ts] for ts in (forget, retain)]
    others = [[t.reshape(-1)[t.numel() // 2 :] for t in ts] for ts in (forget, retain)]
    partials = []
    for f, r in (halves, others):
        rule = TorchJD(UPGrad()).use_reducer(lambda p: partials.append(p) or p)
        rule.statistics(list(f), list(r))
    total = partials[0] + partials[1]
    outputs = [TorchJD(UPGrad()).use_reducer(lambda p: total)(list(f), list(r)) for f, r in (halves, others)]
    for j, w in enumerate(whole):
        # float32 partial sums added in another order: agreement to float32 rounding
        torch.testing.assert_close(
            torch.cat([outputs[0][j], outputs[1][j]]), w.reshape(-1), rtol=1e-5, atol=1e-6
        )


def test_a_stateful_weighting_continues_across_a_checkpoint():
    steps = [grads(seed) for seed in range(5)]
    whole = TorchJD(PCD())
    expected = [flat(whole(f, r)) for f, r in steps]
    first = TorchJD(PCD())
    for f, r in steps[:2]:
        first(f, r)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = TorchJD(PCD())
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.state_dict().keys() == first.state_dict().keys() != set()
    for (f, r), e in zip(steps[2:], expected[2:]):
        torch.testing.assert_close(flat(second(f, r)), e, rtol=0, atol=0)
    fresh = TorchJD(PCD())
    assert not torch.equal(flat(fresh(*steps[2])), expected[2])  # the state matters


def test_without_torchjd_the_error_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchjd(name, *args, **kwargs):
        if name == "torchjd":
            raise ImportError("No module named 'torchjd'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchjd)
    with pytest.raises(ImportError, match=r"pip install 'lit_unlearn\[torchjd\]'"):
        TorchJD(UPGrad())


def test_tables_and_run_names_name_the_aggregator():
    from lit_unlearn.cli import run_name
    from lit_unlearn.logs import describe, rule_name

    assert rule_name(describe(TorchJD(PCD()))) == "TorchJD-PCD"
    config = {
        "model": {
            "synthesizer": {
                "class_path": "lit_unlearn.synthesis.TorchJD",
                "init_args": {"aggregator": {"class_path": "torchjd.aggregation.UPGrad"}},
            }
        },
        "data": {},
        "seed_everything": 0,
    }
    assert run_name(config)[1].startswith("TorchJD-UPGrad_GradientAscent+NLL/")
