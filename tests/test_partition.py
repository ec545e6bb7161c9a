"""Data-parallel evaluation: every document on exactly one rank, ranks in lockstep for sharded
models, and the metrics summed over ranks equal to one process's."""

from __future__ import annotations

import pytest
import torch

from lit_unlearn.partition import Partition


@pytest.mark.parametrize("n, world, batch", [(10, 2, 3), (7, 3, 2), (400, 2, 256), (1, 4, 8), (0, 2, 4)])
def test_every_item_is_evaluated_once_and_lockstep_ranks_run_as_many_batches(n, world, batch):
    items = list(range(n))
    seen, counts = [], []
    for rank in range(world):
        free = list(Partition(rank, world).batches(items, batch))
        locked = list(Partition(rank, world, lockstep=True).batches(items, batch))
        assert all(counted for _, counted in free) and all(len(b) <= batch for b, _ in free)
        assert [b for b, c in locked if c] == [b for b, _ in free]  # dummies only added
        seen += [i for b, _ in free for i in b]
        counts.append(len(locked))
    assert sorted(seen) == items
    assert len(set(counts)) == 1  # a sharded forward is a collective: the same number everywhere


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, **kw):
        self.calls += 1
        return self.model(**kw)


def _two_ranks(compute, lockstep=False):
    """Run ``compute(partition)`` as rank 1 then rank 0 of 2, the all-reduces played by hand:
    rank 1's partial sums are recorded in order, and rank 0's k-th sum adds rank 1's k-th."""
    recorded = []

    def rank1_sum(local):
        recorded.append(local.clone())
        return local  # rank 1's own totals are not looked at

    def rank0_sum(local):
        other = recorded.pop(0)
        assert other.shape == local.shape  # the ranks' collectives meet in the same order
        return local + other

    compute(Partition(1, 2, rank1_sum, lockstep))
    result = compute(Partition(0, 2, rank0_sum, lockstep))
    assert not recorded  # as many sums on both ranks
    return result


@pytest.mark.parametrize("lockstep", [False, True])
def test_probe_metrics_of_two_halves_equal_one_process(smoke_target, lockstep):
    from transformers import AutoModelForCausalLM

    from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus
    from lit_unlearn.benchmarks.synthetic.probes import synthetic_metrics
    from lit_unlearn.models import load_tokenizer

    tok = load_tokenizer(smoke_target)
    corpus = generate_corpus(20)
    model = CountingModel(AutoModelForCausalLM.from_pretrained(smoke_target))
    single = synthetic_metrics(model, tok, corpus)
    whole = model.calls
    model.calls = 0
    halves = _two_ranks(lambda p: synthetic_metrics(model, tok, corpus, p), lockstep)
    assert halves.keys() == single.keys()
    for key in single:
        assert halves[key] == pytest.approx(single[key], rel=1e-6), key
    assert model.calls <= whole + 6  # the two ranks together: about one process's forwards


def test_corpus_nll_and_multiple_choice_of_two_halves_equal_one_process(smoke_target, mc_task, tmp_path):
    from transformers import AutoModelForCausalLM

    from lit_unlearn.benchmarks.synthetic import SyntheticKnowledge
    from lit_unlearn.eval import CorpusNLL, MultipleChoice
    from lit_unlearn.models import load_tokenizer

    tok = load_tokenizer(smoke_target)
    model = AutoModelForCausalLM.from_pretrained(smoke_target)
    nll = CorpusNLL(SyntheticKnowledge("retain", num_people=20), batch_size=5)
    nll.setup(tok, 64)
    mc = MultipleChoice(mc_task[1])
    mc.setup(tok, 64)
    for metric in (nll, mc):
        single = metric.compute(model, tok)
        halves = _two_ranks(lambda p, m=metric: m.compute(model, tok, p))
        # a document may be padded differently on its rank: float32 rounding of the logits
        assert halves == pytest.approx(single, rel=1e-6), type(metric).__name__


@pytest.mark.parametrize("lockstep", [False, True])
def test_membership_inference_of_two_halves_equals_one_process(smoke_target, lockstep):
    """Per-text scores gathered through the sum: means and AUCs exactly one process's."""
    from transformers import AutoModelForCausalLM

    from lit_unlearn.eval import SyntheticMembership
    from lit_unlearn.models import load_tokenizer

    tok = load_tokenizer(smoke_target)
    model = CountingModel(AutoModelForCausalLM.from_pretrained(smoke_target))
    mia = SyntheticMembership(num_people=20, max_texts=15)
    mia.setup(tok, 64)
    single = mia.compute(model, tok)
    whole, model.calls = model.calls, 0
    halves = _two_ranks(lambda p: mia.compute(model, tok, p), lockstep)
    assert halves == single and any(k.endswith("_auc") for k in single)
    assert model.calls <= whole + 3  # every text scored once over the two ranks (+ lockstep dummies)
