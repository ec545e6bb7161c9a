"""Pairing: forget-anchored epochs, determinism, rank-disjointness, world-size invariance, resume."""

from __future__ import annotations

import pytest

from lit_unlearn.data.sampling import PairedBatchSampler


def batches(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_length_is_anchored_on_the_forget_set():
    s = PairedBatchSampler(forget_size=40, retain_size=7, forget_batch_size=4, retain_batch_size=6)
    out = batches(s)
    assert len(out) == len(s) == 10
    assert sorted(i for f, _ in out for i in f) == list(range(40))  # every forget example once
    assert all(len(f) == 4 and len(r) == 6 for f, r in out)


def test_retain_stream_cycles_with_its_own_order_across_epochs():
    s = PairedBatchSampler(forget_size=8, retain_size=10, forget_batch_size=2, retain_batch_size=3)
    stream = [i for e in range(3) for _, r in batches(s, e) for i in r]  # 3 epochs x 4 batches x 3
    assert len(stream) == 36
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new shuffle per cycle
    # epoch 1 continues where epoch 0 stopped instead of restarting the retain stream
    assert batches(s, 1)[0][1] == stream[12:15]


def test_same_seed_same_batches_other_seed_other_batches():
    make = lambda seed: PairedBatchSampler(30, 50, 3, 5, seed=seed)  # noqa: E731
    assert batches(make(1)) == batches(make(1))
    assert batches(make(1)) != batches(make(2))
    assert batches(make(1), epoch=0) != batches(make(1), epoch=1)


def test_two_ranks_see_disjoint_samples_that_union_to_one_rank_at_double_batch():
    r0 = batches(PairedBatchSampler(32, 48, 2, 3, seed=4, rank=0, world_size=2))
    r1 = batches(PairedBatchSampler(32, 48, 2, 3, seed=4, rank=1, world_size=2))
    single = batches(PairedBatchSampler(32, 48, 4, 6, seed=4))
    assert len(r0) == len(r1) == len(single) == 8
    for (f0, q0), (f1, q1), (f, q) in zip(r0, r1, single):
        assert not set(f0) & set(f1) and not set(q0) & set(q1)
        assert f0 + f1 == f and q0 + q1 == q


def test_k_micro_batches_equal_one_k_times_larger_batch():
    small = batches(PairedBatchSampler(24, 36, 2, 3, seed=9))
    big = batches(PairedBatchSampler(24, 36, 6, 9, seed=9))
    for step, (f, r) in enumerate(big):
        micro = small[3 * step : 3 * step + 3]
        assert [i for m in micro for i in m[0]] == f
        assert [i for m in micro for i in m[1]] == r


def test_skip_resumes_mid_epoch():
    s = PairedBatchSampler(20, 30, 2, 2, seed=3)
    full = batches(s, 2)
    s.set_epoch(2)
    s.skip(4)
    assert list(s) == full[4:]
    assert list(s) == full  # skip applies to one iteration only


def test_a_skip_bound_to_a_finished_epoch_leaves_the_next_epoch_whole():
    """A checkpoint written after an epoch's last batch resumes in the next epoch (Lightning
    advances it): the skip recorded for the finished epoch must not eat the new one's batches."""
    s = PairedBatchSampler(20, 30, 2, 2, seed=3)
    epoch_two, epoch_three = batches(s, 2), batches(s, 3)
    s.set_epoch(3)
    s.skip(len(s), epoch=2)
    assert list(s) == epoch_three
    s.set_epoch(2)
    s.skip(4, epoch=2)
    assert list(s) == epoch_two[4:]


def test_too_small_forget_set_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairedBatchSampler(3, 10, 2, 2, world_size=2)
