"""The compiled synthesis path equals the eager one, falls back cleanly, and compiles once."""

from __future__ import annotations

import warnings

import pytest
import torch

from lit_unlearn.synthesis import GRU, RULES, SAGO, PCGrad, Synthesizer, TorchJD
from lit_unlearn.synthesis.compiled import CompiledPasses
from tests.synthesis.test_properties import make_grads, make_rule


@pytest.fixture(autouse=True)
def _compile_on(monkeypatch):
    monkeypatch.setenv("LIT_UNLEARN_COMPILE", "1")


def eager(rule: Synthesizer) -> Synthesizer:
    rule._compiled = False
    return rule


def both(cls, **kwargs) -> tuple[Synthesizer, Synthesizer]:
    kwargs = {"forget_weight": 0.7, "retain_weight": 1.3, **kwargs}
    return make_rule(cls, **kwargs), eager(make_rule(cls, **kwargs))


@pytest.mark.parametrize("cls", RULES, ids=lambda c: c.__name__)
def test_compiled_rule_writes_the_eager_update_into_the_retain_gradient(cls):
    """The engine's call: ``out`` is the retain gradient itself."""
    compiled, reference = both(cls)
    forget, retain = make_grads(3, zero_frac=0.2)
    expected = reference(forget, [r.clone() for r in retain])
    out = [r.clone() for r in retain]
    update = compiled(forget, out, out=out)
    assert compiled.compiled_passes() is not None and compiled.compile_seconds > 0
    assert all(u is o for u, o in zip(update, out))
    for u, e in zip(update, expected):
        torch.testing.assert_close(u, e, rtol=1e-5, atol=1e-6)
    assert compiled.last_report.keys() == reference.last_report.keys()
    for key, value in reference.last_report.items():
        torch.testing.assert_close(compiled.last_report[key], value, rtol=1e-5, atol=1e-6)


def test_the_second_call_reuses_the_kernels():
    rule = make_rule(PCGrad)
    forget, retain = make_grads(4)
    rule(forget, retain)
    seconds = rule.compile_seconds
    torch._dynamo.utils.counters.clear()
    second = rule(forget, retain)
    assert rule.compile_seconds == seconds
    assert not torch._dynamo.utils.counters["stats"].get("unique_graphs")
    for u, e in zip(second, eager(make_rule(PCGrad))(forget, retain)):
        torch.testing.assert_close(u, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [SAGO, PCGrad], ids=lambda c: c.__name__)
def test_mixed_storage_dtypes_and_float64(cls):
    """An fp32 forget buffer next to bf16 gradients; float64 stays float64 (PCGrad's sums are
    float32, accumulated in another order: its float64 update agrees to float32 rounding)."""
    compiled, reference = both(cls)
    forget, retain = make_grads(5)
    retain16 = [r.bfloat16() for r in retain]
    update = compiled(forget, retain16)
    assert all(u.dtype == torch.bfloat16 for u in update)
    for u, e in zip(update, reference(forget, retain16)):
        torch.testing.assert_close(u.float(), e.float(), rtol=1e-2, atol=1e-2)
    f64, r64 = make_grads(6, dtype=torch.float64)
    for u, e in zip(compiled(f64, r64), reference(f64, r64)):
        assert u.dtype == torch.float64
        tol = 1e-12 if cls is SAGO else 1e-5
        torch.testing.assert_close(u, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_torchjd_bridge_compiles_its_gramian_sums(scope):
    from torchjd.aggregation import UPGrad

    compiled, reference = both(TorchJD, aggregator=UPGrad(), scope=scope)
    forget, retain = make_grads(7)
    for u, e in zip(compiled(forget, retain), reference(forget, retain)):
        torch.testing.assert_close(u, e, rtol=1e-4, atol=1e-5)
    assert compiled.compile_seconds > 0


def test_a_new_rule_compiles_from_its_combine_alone():
    class Halfway(Synthesizer):
        granularity = "element"

        def combine(self, forget, retain, stats=None):
            return 0.5 * (self.forget_weight * forget + self.retain_weight * retain)

    forget, retain = make_grads(8)
    rule = Halfway(forget_weight=2.0)
    for u, f, r in zip(rule(forget, retain), forget, retain):
        torch.testing.assert_close(u, f + 0.5 * r)
    assert rule.compile_seconds > 0


def test_reducer_gets_one_call_with_the_partial_sums():
    calls = []

    def reducer(partial):
        calls.append(partial.clone())
        return partial

    forget, retain = make_grads(9)
    make_rule(PCGrad).use_reducer(reducer)(forget, retain)
    eager_partial = eager(make_rule(PCGrad)).partial_sums(forget, retain)
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], eager_partial, rtol=1e-5, atol=1e-6)


def test_gru_moves_its_average_in_the_compiled_pass_as_eagerly_over_steps():
    compiled, reference = both(GRU, ema=0.5)
    for seed in range(3):  # the average carries over: three steps
        forget, retain = make_grads(20 + seed)
        for u, e in zip(compiled(forget, retain), reference(forget, retain)):
            torch.testing.assert_close(u, e, rtol=1e-5, atol=1e-6)
    assert compiled.compiled
    for a, b in zip(compiled.average, reference.average):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gru_finishes_a_step_eagerly_when_its_combine_fails_to_compile(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("inductor could not lower this")

    compiled, reference = both(GRU, ema=0.5)
    forget, retain = make_grads(30)
    monkeypatch.setattr(CompiledPasses, "combine", broken)
    with pytest.warns(RuntimeWarning, match="GRU: compiled synthesis is unavailable"):
        update = compiled(forget, retain)
    for u, e in zip(update, reference(forget, retain)):  # the average moved once, not twice
        torch.testing.assert_close(u, e, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled.average, reference.average):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_switched_off_by_the_environment_and_for_a_rule_with_its_own_data_flow(monkeypatch):
    class OwnFlow(SAGO):
        def combine_tensor(self, state, index, forget, retain, out):
            out.copy_(self.combine(forget, retain))

    assert make_rule(OwnFlow).compiled_passes() is None  # an unknown data flow is not traced
    monkeypatch.setenv("LIT_UNLEARN_COMPILE", "0")
    rule = make_rule(SAGO)
    forget, retain = make_grads(10)
    rule(forget, retain)
    assert rule.compiled_passes() is None and rule.compile_seconds == 0.0


def test_a_compilation_failure_warns_once_and_runs_eagerly(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("no C++ compiler found\nlong traceback")

    monkeypatch.setattr(CompiledPasses, "combine", broken)
    rule = make_rule(SAGO, forget_weight=0.7, retain_weight=1.3)
    forget, retain = make_grads(11)
    expected = eager(make_rule(SAGO, forget_weight=0.7, retain_weight=1.3))(forget, retain)
    with pytest.warns(
        RuntimeWarning, match=r"SAGO: compiled synthesis is unavailable \(RuntimeError: no C\+\+"
    ):
        first = rule(forget, retain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = rule(forget, retain)
    for u, v, e in zip(first, second, expected):
        assert torch.equal(u, e) and torch.equal(v, e)
    assert rule.compiled_passes() is None
