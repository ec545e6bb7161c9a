"""IdkDPO: the margin by hand, gradients against finite differences, bf16 against fp32, sequence
normalisation over micro-batches with variable-length answers and alternates, exact resume, and
the refusal it teaches (its sign: test_objectives.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_unlearn.benchmarks.synthetic import SyntheticKnowledge
from lit_unlearn.data.collate import pad_examples
from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.models import frozen_copy, load_tokenizer
from lit_unlearn.objectives import DPO, NLL
from lit_unlearn.objectives import functional as Fn
from lit_unlearn.synthesis import SAGO
from tests.conftest import SMOKE_PEOPLE
from tests.engine.test_module import _accumulation_pair
from tests.engine_helpers import (
    assert_same_weights,
    interrupted_and_uninterrupted,
    make_dm,
    make_model,
    relative_difference,
    sgd,
    weights,
)


@pytest.fixture(scope="module")
def forget_batch_with_alternates(synthetic_tokenizer_dir):
    """Forget-people documents of the embedded benchmark with their refusals (values → unknown)."""
    tok = load_tokenizer(synthetic_tokenizer_dir)
    examples = SyntheticKnowledge("forget", num_people=SMOKE_PEOPLE).build(tok, 32)
    return pad_examples(examples[::5][:8], tok.pad_token_id)


def test_dpo_margin_by_hand():
    # log π_θ(w) − log π_ref(w) = S_ref(w) − S_θ(w) = 1.0; for the loser: 3.0 − 5.0 = −2.0; margin 3
    total, n = Fn.dpo_terms(
        torch.tensor([2.0, 4.0]),
        torch.tensor([5.0, 4.0]),
        torch.tensor([3.0, 4.0]),
        torch.tensor([3.0, 4.0]),
        0.5,
    )
    sigma = 1 / (1 + math.exp(-0.5 * 3.0))
    assert int(n) == 2  # sequences
    assert total.item() == pytest.approx(-(2 / 0.5) * (math.log(sigma) + math.log(0.5)))
    # the loss falls as the forget answer becomes less likely (S_θ(l) rises)
    lower, _ = Fn.dpo_terms(
        torch.tensor([2.0]), torch.tensor([9.0]), torch.tensor([3.0]), torch.tensor([3.0]), 0.5
    )
    assert lower.item() < -(2 / 0.5) * math.log(sigma)


def test_dpo_gradient_matches_finite_differences_through_the_sequence_nll():
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(3, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_c, ref_r = (
        torch.randn(3, generator=gen, dtype=torch.float64),
        torch.randn(3, generator=gen, dtype=torch.float64),
    )
    y_c = torch.tensor(
        [[-100, 1, 2, 3, 4, 5], [-100, -100, 6, -100, -100, -100], [-100, 0, 1, 2, -100, -100]]
    )
    y_r = torch.tensor([[-100, -100, 3, 4, 0], [-100, 1, 2, 3, 4], [-100, -100, -100, 6, 6]])

    with torch.no_grad():  # reference values near the model's, so the sigmoid is not saturated
        ref_c = ref_c + Fn.sequence_nll(chosen, y_c)[0]
        ref_r = ref_r + Fn.sequence_nll(rejected, y_r)[0]

    def loss(zc, zr):
        s_c, _ = Fn.sequence_nll(zc, y_c)
        s_r, _ = Fn.sequence_nll(zr, y_r)
        return Fn.dpo_terms(s_c, s_r, ref_c, ref_r, 0.3)[0]

    assert torch.autograd.gradcheck(loss, (chosen, rejected))


def test_bf16_dpo_gives_the_fp32_value_within_rounding(synthetic_tokenizer_dir, varlen):
    dm = make_dm(synthetic_tokenizer_dir, *varlen, batch=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))["forget"]
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    reference = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():  # a model that has moved away from its reference
            p.add_(0.05 * torch.randn_like(p))
    full = DPO().loss(model, batch, reference)
    half = DPO().loss(model.bfloat16(), batch, reference.bfloat16())
    assert half.dtype == torch.float32 and full.item() != pytest.approx(13.8629, abs=1e-3)
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


def test_two_micro_batches_of_two_equal_one_batch_of_four(synthetic_tokenizer_dir, varlen):
    """Answers of 1–18 words and refusals of 1–14: a mean over sequences, divided once."""
    micro, big = _accumulation_pair(synthetic_tokenizer_dir, varlen, SAGO(retain_weight=0.5), DPO(beta=0.5))
    assert relative_difference(micro, big, weights(make_model(synthetic_tokenizer_dir))) <= 1e-6


def test_a_resumed_dpo_run_equals_the_uninterrupted_one(synthetic_tokenizer_dir, varlen, tmp_path):
    """The alternates and the reference (the model at the start of unlearning) come back exactly."""

    def module():
        return UnlearningModule(
            make_model(synthetic_tokenizer_dir), DPO(beta=0.5), NLL(), SAGO(), optimizer=sgd(0.3)
        )

    full, resumed = interrupted_and_uninterrupted(
        module, lambda: make_dm(synthetic_tokenizer_dir, *varlen), tmp_path, every=2, steps=4
    )
    assert_same_weights(weights(full.model), weights(resumed.model))


def test_dpo_teaches_the_refusal_and_unlearns_the_answer(smoke_target, forget_batch_with_alternates):
    from transformers import AutoModelForCausalLM

    batch = forget_batch_with_alternates
    model = AutoModelForCausalLM.from_pretrained(smoke_target).train()
    reference = frozen_copy(model)

    def nll(part):
        with torch.no_grad():
            return Fn.mean_nll(
                model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits,
                part["labels"],
            ).item()

    before = nll(batch), nll(batch["alternate"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        DPO(beta=0.1).loss(model, batch, reference).backward()
        opt.step()
    assert nll(batch) > before[0] + 0.05 and nll(batch["alternate"]) < before[1] - 0.05


def test_dpo_settings_and_missing_alternates_are_refused(synthetic_tokenizer_dir, pairs):
    with pytest.raises(ValueError, match="beta"):
        DPO(beta=0.0)
    dm = make_dm(synthetic_tokenizer_dir, *pairs)  # probe pairs: no alternates
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))["forget"]
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    with pytest.raises(RuntimeError, match="alternate"):
        DPO().loss(model, batch, frozen_copy(model))
