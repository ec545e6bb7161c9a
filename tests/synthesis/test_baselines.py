"""BLUR and GRU: hand computations, what each protects (and a counter-example for retention), the
sharded reduction, and GRU's moving average across steps, checkpoints and resumes."""

from __future__ import annotations

import pytest
import torch

from lit_unlearn.synthesis import BLUR, GRU
from tests.synthesis.test_guarantees import conflicting_grads


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def test_blur_by_hand_over_two_tensors():
    f = [torch.tensor([2.0, 0.0]), torch.tensor([1.0])]
    r = [torch.tensor([1.0, 1.0]), torch.tensor([3.0])]
    # <g_r, g_f> = 2 + 3 = 5, ||g_f||^2 = 5: c = 1 (global, not per tensor); gamma 2, alpha 0.5
    u = BLUR(forget_weight=2.0, retain_weight=0.5)(f, r)
    c = 5.0 / (5.0 + 1e-10)
    expected = [2.0 * ff + 0.5 * (rr - c * ff) for ff, rr in zip(f, r)]
    for a, b in zip(u, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_blur_projects_even_without_conflict():
    """No conflict test: agreeing gradients lose their shared component too."""
    (u,) = BLUR(forget_weight=0.0)([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])])
    torch.testing.assert_close(u, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("seed", range(12))
def test_blur_protects_the_forget_direction_not_retention(seed):
    forget, retain = conflicting_grads(seed, 1.0)
    u = flat(BLUR(forget_weight=1.0, retain_weight=1.0)(forget, retain))
    f = flat(forget)
    assert torch.dot(u, f) >= -1e-5 * u.norm() * f.norm()  # forget-first: <u, g_f> >= 0


def test_blur_counter_example_opposes_retention():
    # a strong conflict: <u, g_r> = gamma <f, r> + alpha (|r|^2 - <f, r>^2 / |f|^2) = -3 + 0 < 0
    f, r = [torch.tensor([-3.0, 0.0])], [torch.tensor([1.0, 0.0])]
    (u,) = BLUR()(f, r)
    assert torch.dot(u, r[0]) < 0


def gru_by_hand(steps, gamma=1.0, ema=0.8):
    """Float64 reference of the GRU recursion over a list of (forget, retain) flat vectors."""
    average = torch.zeros_like(steps[0][0], dtype=torch.float64)
    updates = []
    for f, r in steps:
        f, r = f.double(), r.double()
        average = ema * r + (1 - ema) * average
        d = torch.dot(f, average)
        if d < 0:
            f = f - d / (average.dot(average) + 1e-10) * average
        updates.append(gamma * f)
    return updates


def random_steps(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n):
        r = torch.randn(12, generator=gen)
        f = torch.randn(12, generator=gen) - 1.2 * r  # mostly conflicting
        steps.append((f, r))
    return steps


def split(v):
    return [v[:5].clone(), v[5:].reshape(7).clone()]


def test_gru_follows_the_recursion_across_steps():
    steps = random_steps(4)
    rule = GRU(forget_weight=0.5, ema=0.7)
    expected = gru_by_hand(steps, gamma=0.5, ema=0.7)
    for (f, r), e in zip(steps, expected):
        u = flat(rule(split(f), split(r)))
        torch.testing.assert_close(u, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_gru_never_opposes_its_average_but_may_oppose_the_current_retain_gradient(seed):
    rule = GRU()
    for f, r in random_steps(3, seed):
        u = flat(rule(split(f), split(r)))
        average = flat(rule.average)
        assert torch.dot(u, average) >= -1e-5 * u.norm() * average.norm()


def test_gru_counter_example_opposes_the_current_retain_gradient():
    rule = GRU(ema=0.1)
    rule([torch.tensor([0.0, 0.0])], [torch.tensor([1.0, 0.0])])  # the average points along x
    f, r = [torch.tensor([1.0, -1.0])], [torch.tensor([0.0, 1.0])]  # g_r turned; the average lags
    (u,) = rule(f, r)
    assert torch.dot(u, r[0]) < 0


def test_gru_state_dict_continues_the_same_average():
    steps = random_steps(5, seed=3)
    whole = GRU()
    expected = [flat(whole(split(f), split(r))) for f, r in steps]
    first = GRU()
    for f, r in steps[:2]:
        first(split(f), split(r))
    saved = torch.load(_roundtrip(first.state_dict()), weights_only=True)
    second = GRU()
    second.load_state_dict(saved)
    for (f, r), e in zip(steps[2:], expected[2:]):
        assert torch.equal(flat(second(split(f), split(r))), e)


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_gru_refuses_an_average_of_other_tensors():
    rule = GRU()
    rule.load_state_dict({"average": [torch.zeros(3)]})
    with pytest.raises(ValueError, match="moving average does not match"):
        rule([torch.zeros(2)], [torch.zeros(2)])


def test_gru_average_is_kept_in_the_forget_buffer_dtype():
    rule = GRU()
    rule([torch.zeros(4)], [torch.ones(4, dtype=torch.bfloat16)])  # fp32 buffer, bf16 .grad
    assert rule.average[0].dtype == torch.float32


@pytest.mark.parametrize("rule_cls", [BLUR, GRU])
def test_sharded_sums_through_the_reducer_equal_whole_tensors(rule_cls):
    """Two shards of every tensor, their partial sums added by the reducer (what AllReduceSum
    does across FSDP ranks): each shard's update equals the whole tensors' update."""
    forget, retain = conflicting_grads(1, 1.0)
    whole = rule_cls()(forget, retain)
    halves = [[t.reshape(-1)[: t.numel() // 2] for t in ts] for ts in (forget, retain)]
    others = [[t.reshape(-1)[t.numel() // 2 :] for t in ts] for ts in (forget, retain)]
    rules = [rule_cls(), rule_cls()]
    partials = []
    for rule, (f, r) in zip(rules, (halves, others)):
        rule.use_reducer(lambda p: partials.append(p) or p)
        rule.statistics(list(f), list(r))  # collect this shard's partial sums
    total = partials[0] + partials[1]
    outputs = []
    for rule, (f, r) in zip([rule_cls(), rule_cls()], (halves, others)):
        rule.use_reducer(lambda p: total)
        outputs.append(rule(list(f), list(r)))
    for j, w in enumerate(whole):
        joined = torch.cat([outputs[0][j], outputs[1][j]])
        torch.testing.assert_close(joined, w.reshape(-1), rtol=1e-5, atol=1e-6)


def test_gru_resume_equals_an_uninterrupted_run(synthetic_tokenizer_dir, varlen, tmp_path):
    from lit_unlearn.engine.module import UnlearningModule
    from lit_unlearn.objectives import NLL, GradientAscent
    from tests.engine_helpers import (
        assert_same_weights,
        interrupted_and_uninterrupted,
        make_dm,
        make_model,
        sgd,
        weights,
    )

    def module():
        return UnlearningModule(
            make_model(synthetic_tokenizer_dir), GradientAscent(), NLL(), GRU(ema=0.6), optimizer=sgd(0.2)
        )

    full, resumed = interrupted_and_uninterrupted(
        module, lambda: make_dm(synthetic_tokenizer_dir, *varlen), tmp_path, 2, 5
    )
    assert full.synthesizer.average is not None
    for a, b in zip(full.synthesizer.average, resumed.synthesizer.average):
        assert torch.equal(a, b)
    assert_same_weights(weights(full.model), weights(resumed.model), atol=0)
