"""Probe metrics: padding-safety against one-by-one evaluation, and the smoke target's quality."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus
from lit_unlearn.benchmarks.synthetic.probes import next_token_accuracy, perplexity, synthetic_metrics
from lit_unlearn.models import load_tokenizer
from tests.conftest import SMOKE_PEOPLE


@pytest.fixture(scope="module")
def target(smoke_target):
    return AutoModelForCausalLM.from_pretrained(smoke_target), load_tokenizer(smoke_target)


def test_batched_accuracy_equals_one_by_one(target):
    model, tok = target
    probes = (
        generate_corpus(SMOKE_PEOPLE).probes_for("qa")[:30]
        + generate_corpus(SMOKE_PEOPLE).probes_for("arithmetic")[:30]
    )
    prompts, answers = [p.prompt for p in probes], [p.answer for p in probes]
    batched = next_token_accuracy(model, tok, prompts, answers, batch_size=64)
    single = sum(
        next_token_accuracy(model, tok, [p], [a], batch_size=1) for p, a in zip(prompts, answers)
    ) / len(prompts)
    assert batched == pytest.approx(single)


def test_perplexity_is_padding_safe_and_matches_manual_nll(target):
    model, tok = target
    texts = ["1 plus 2 equals 3 .", "count up from 3 : 3 4 5 6 7 ."]
    batched = perplexity(model, tok, texts, batch_size=2)
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    assert batched == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_smoke_target_trains_clearly_above_chance(target):
    model, tok = target
    m = synthetic_metrics(model, tok, generate_corpus(SMOKE_PEOPLE))
    # chance is 1/20 cities ... 1/40 years; the smoke recipe reaches ~0.99 on 20 people
    assert m["forget_qa"] >= 0.6 and m["retain_qa"] >= 0.6
    assert math.isfinite(m["general_ppl"])


def test_multi_token_answers_are_rejected(target):
    model, tok = target
    with pytest.raises(ValueError, match="single-token answers"):
        next_token_accuracy(model, tok, ["Q :"], ["kelmsby aldoria"])
