"""A property suite applied to every exported synthesizer (docs/method.md)."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

import lit_unlearn.synthesis as synthesis
from lit_unlearn.synthesis import RULES, Synthesizer
from lit_unlearn.synthesis import base as synthesis_base

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (6, 6)]


def make_grads(seed: int, scale: float = 1.0, dtype=torch.float32, zero_frac: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    forget, retain = [], []
    for shape in SHAPES:
        f = torch.randn(shape, generator=gen) * scale
        r = torch.randn(shape, generator=gen) * scale
        if zero_frac:
            f[torch.rand(shape, generator=gen) < zero_frac] = 0
            r[torch.rand(shape, generator=gen) < zero_frac] = 0
        forget.append(f.to(dtype))
        retain.append(r.to(dtype))
    return forget, retain


def make_rule(cls: type[Synthesizer], **kwargs) -> Synthesizer:
    """``cls`` with the keyword arguments it takes (GRU has no retain weight)."""
    import inspect

    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


class FromInitialState:
    """A stateful rule (GRU) called from its initial state every time: the properties are about
    the map ``(g_f, g_r) -> u`` at one step, which for such a rule depends on what came before."""

    def __init__(self, rule: Synthesizer) -> None:
        self.rule = rule

    def __getattr__(self, name: str):
        if name == "rule":  # while copy.copy builds the object, before __init__'s attribute exists
            raise AttributeError(name)
        return getattr(self.rule, name)

    def __call__(self, *args, **kwargs):
        import copy

        fresh = copy.deepcopy(self.rule)
        if "fused_kernel" in self.__dict__:  # a test replaced the fast path on this wrapper
            fresh.fused_kernel = self.__dict__["fused_kernel"]
        return fresh(*args, **kwargs)


def rules(**kwargs) -> list[Synthesizer]:
    made = [make_rule(cls, **kwargs) for cls in RULES]
    return [FromInitialState(r) if r.state_buffers else r for r in made]  # type: ignore[misc]


def rule_id(rule: Synthesizer) -> str:
    return type(getattr(rule, "rule", rule)).__name__


ALL = pytest.mark.parametrize("rule", rules(forget_weight=0.7, retain_weight=1.3), ids=rule_id)


def test_every_exported_rule_is_covered():
    exported = {
        getattr(synthesis, name)
        for name in synthesis.__all__
        if isinstance(getattr(synthesis, name), type)
        and issubclass(getattr(synthesis, name), Synthesizer)
        and getattr(synthesis, name) is not Synthesizer
    }
    assert exported == set(RULES) | {
        synthesis.TorchJD
    }  # the bridge needs an aggregator: tests/synthesis/test_torchjd.py
    assert {cls.granularity for cls in RULES} == {"element", "tensor", "global"}


@ALL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_and_dtypes_are_kept(rule, dtype):
    forget, retain = make_grads(0, dtype=dtype)
    update = rule(forget, retain)
    assert [u.shape for u in update] == [r.shape for r in retain]
    assert all(u.dtype == dtype for u in update)
    assert all(torch.isfinite(u).all() for u in update)


@ALL
@pytest.mark.parametrize("seed", range(5))
def test_scale_equivariance(rule, seed):
    forget, retain = make_grads(seed)
    base = rule(forget, retain)
    scaled = rule([4.0 * f for f in forget], [4.0 * r for r in retain])
    for u, s in zip(base, scaled):
        torch.testing.assert_close(s, 4.0 * u, rtol=1e-5, atol=1e-6)


@ALL
def test_permutation_equivariance_over_parameters(rule):
    forget, retain = make_grads(3)
    perm = [3, 0, 4, 2, 1]
    base = rule(forget, retain)
    permuted = rule([forget[i] for i in perm], [retain[i] for i in perm])
    for k, i in enumerate(perm):
        torch.testing.assert_close(permuted[k], base[i], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", [r for r in rules() if r.granularity == "element"], ids=rule_id)
def test_element_rules_per_tensor_equal_concatenation(rule):
    forget, retain = make_grads(4)
    per_tensor = torch.cat([u.reshape(-1) for u in rule(forget, retain)])
    flat = rule([torch.cat([f.reshape(-1) for f in forget])], [torch.cat([r.reshape(-1) for r in retain])])[0]
    assert torch.equal(per_tensor, flat)


@ALL
@pytest.mark.parametrize("zero_frac", [1.0, 0.5])
def test_zeros_give_no_nan(rule, zero_frac):
    forget, retain = make_grads(5, zero_frac=zero_frac)
    update = rule(forget, retain)
    assert all(torch.isfinite(u).all() for u in update)
    if zero_frac == 1.0:
        assert all((u == 0).all() for u in update)


@ALL
def test_bf16_close_to_fp32(rule):
    forget, retain = make_grads(6)
    ref = rule(forget, retain)
    low = rule([f.bfloat16() for f in forget], [r.bfloat16() for r in retain])
    for u, lo in zip(ref, low):
        torch.testing.assert_close(lo.float(), u, rtol=0.05, atol=0.05)


@ALL
@pytest.mark.parametrize("target", ["retain", "forget", "fresh"])
def test_writing_into_caller_storage_matches_fresh_output(rule, target):
    forget, retain = make_grads(7)
    expected = rule(forget, retain)
    f2, r2 = [f.clone() for f in forget], [r.clone() for r in retain]
    out = {"retain": r2, "forget": f2, "fresh": [torch.empty_like(r) for r in retain]}[target]
    result = rule(f2, r2, out=out)
    assert result is not None and all(a is b for a, b in zip(result, out))
    for e, u in zip(expected, out):
        assert torch.equal(e, u)


@ALL
def test_chunk_boundaries_do_not_change_the_result(rule, monkeypatch):
    forget, retain = make_grads(8)
    expected = rule(forget, retain)
    monkeypatch.setattr(synthesis_base, "CPU_CHUNK", 4)
    chunked = rule(forget, retain)
    for e, u in zip(expected, chunked):
        torch.testing.assert_close(u, e, rtol=1e-6, atol=1e-7)


@ALL
def test_mixed_storage_dtypes(rule):
    """An fp32 forget buffer next to bf16 retain gradients (the engine under bf16-true)."""
    forget, retain = make_grads(9)
    retain16 = [r.bfloat16() for r in retain]
    update = rule(forget, retain16)
    assert all(u.dtype == torch.bfloat16 for u in update)
    ref = rule(forget, [r.float() for r in retain16])
    for u, e in zip(update, ref):
        torch.testing.assert_close(u.float(), e, rtol=0.02, atol=0.02)


@ALL
def test_observer_sees_every_tensor_and_does_not_change_the_update(rule):
    forget, retain = make_grads(10)
    expected = rule(forget, retain)
    seen = []

    def observer(j, f, r, u):
        seen.append(j)
        assert torch.equal(r, retain[j])  # the retain gradient is still intact
        assert torch.equal(u, expected[j])

    r2 = [r.clone() for r in retain]
    rule(forget, r2, out=r2, observer=observer)
    assert seen == list(range(len(SHAPES)))
    assert all(torch.equal(a, b) for a, b in zip(r2, expected))


@ALL
def test_empty_parameter_list(rule):
    assert rule([], []) == []


@pytest.mark.parametrize(
    ("forget", "retain", "message"),
    [
        ([torch.zeros(2)], [torch.zeros(2), torch.zeros(1)], "one tensor per parameter"),
        ([torch.zeros(2)], [torch.zeros(3)], "gradient 0: forget shape"),
        ([torch.zeros(2)], [torch.zeros(2, device="meta")], "gradient 0: forget on cpu but retain on meta"),
        ([torch.zeros(2, dtype=torch.long)], [torch.zeros(2)], "floating-point"),
    ],
)
def test_mismatched_inputs_raise_value_error(forget, retain, message):
    for rule in rules():
        with pytest.raises(ValueError, match=message):
            rule(forget, retain)


def test_bad_out_and_weights_raise_value_error():
    with pytest.raises(ValueError, match="out 0"):
        synthesis.SAGO()([torch.zeros(2)], [torch.zeros(2)], out=[torch.zeros(3)])
    with pytest.raises(ValueError, match="forget_weight must be a finite number"):
        synthesis.SAGO(forget_weight=float("nan"))
    with pytest.raises(ValueError, match="retain_weight"):
        synthesis.PCGrad(retain_weight=-1.0)


def test_repr_is_short_and_names_the_weights():
    assert (
        repr(synthesis.SAGO(forget_weight=1.0, retain_weight=0.5))
        == "SAGO(forget_weight=1, retain_weight=0.5)"
    )


@pytest.mark.parametrize(
    "module", ["base", "weighted", "projection", "gating", "diagnostics", "baselines"], ids=str
)
def test_docstring_examples(module):
    mod = importlib.import_module(f"lit_unlearn.synthesis.{module}")
    failures, _ = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert failures == 0


@ALL
def test_fast_path_equals_combine(rule):
    """The fused kernel of a shipped rule is only an optimisation of its ``combine``."""
    import copy

    forget, retain = make_grads(5, zero_frac=0.2, dtype=torch.float64)
    fast = rule(forget, retain)
    plain = copy.copy(rule)
    plain.fused_kernel = lambda stats: None  # what a rule without a fast path runs
    for a, b in zip(fast, plain(forget, retain)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
