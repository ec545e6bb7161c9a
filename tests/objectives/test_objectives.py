"""Objective maths (hand-computed values), signs (SGD on L_forget raises the forget NLL), RMU's
parameter selection and NPO's precomputed reference."""

from __future__ import annotations

import math

import pytest
import torch

from lit_unlearn.benchmarks.synthetic import SyntheticKnowledge
from lit_unlearn.data.collate import pad_examples
from lit_unlearn.engine.model_setup import ModelSetup
from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.models import frozen_copy, load_tokenizer
from lit_unlearn.objectives import (
    CEU,
    DPO,
    KL,
    NLL,
    NPO,
    RMU,
    UNDIAL,
    WGA,
    EmbedDiff,
    GradientAscent,
    SatImp,
    SimNPO,
)
from lit_unlearn.objectives import functional as Fn
from lit_unlearn.objectives.base import capture_layer_output, decoder_layers
from lit_unlearn.synthesis import SAGO
from tests.conftest import SMOKE_PEOPLE
from tests.engine_helpers import fit, make_dm, make_model, sgd, weights


@pytest.fixture(scope="module")
def forget_batch(synthetic_tokenizer_dir):
    """Forget-people documents with value-token labels (what the smoke target has learned)."""
    tok = load_tokenizer(synthetic_tokenizer_dir)
    examples = SyntheticKnowledge("forget", num_people=SMOKE_PEOPLE).build(tok, 32)
    batch = pad_examples(examples[::5][:8], tok.pad_token_id)
    batch["index"] = torch.arange(8)
    return batch


def test_functional_values_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[-100, 0, 2]])  # position 0 predicts label 0 (p=.5), position 1 predicts 2 (p=.8)
    seq, n = Fn.sequence_nll(logits, labels)
    assert seq.item() == pytest.approx(-math.log(0.5) - math.log(0.8), rel=1e-6) and n.item() == 2
    assert Fn.mean_nll(logits, labels).item() == pytest.approx(seq.item() / 2, rel=1e-6)
    # NPO: -(2/β) log σ(β (S - S_ref)); SimNPO: -(2/β) log σ(β (S/|y| - δ))
    s, s_ref, beta = torch.tensor([3.0]), torch.tensor([1.0]), 0.5
    assert Fn.npo_loss(s, s_ref, beta).item() == pytest.approx(
        -(2 / beta) * math.log(1 / (1 + math.exp(-beta * 2.0)))
    )
    assert Fn.simnpo_loss(s, torch.tensor([2]), beta, 0.1).item() == pytest.approx(
        -(2 / beta) * math.log(1 / (1 + math.exp(-beta * (1.5 - 0.1))))
    )
    assert Fn.kl_to_reference(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-7)
    h = torch.ones(1, 3, 4)
    assert Fn.masked_mse(h, torch.zeros(1, 3, 4), torch.tensor([[-100, 1, 1]])).item() == pytest.approx(1.0)


def forget_nll(model, batch):
    with torch.no_grad():
        return Fn.mean_nll(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        ).item()


@pytest.mark.parametrize(
    "objective, lr",
    [
        (GradientAscent(), 0.1),
        (NPO(beta=0.1), 0.1),
        (DPO(beta=0.1), 0.1),
        (SimNPO(beta=2.5, delta=0.0), 0.1),
        (RMU(layer=1, steering_coeff=5.0), 0.1),
        # the reweighted losses ease off near-certain tokens: a trained target needs a larger step
        (WGA(), 0.5),
        (SatImp(), 0.5),
        (UNDIAL(), 0.5),
        (CEU(), 0.5),
    ],
    ids=lambda o: type(o).__name__ if not isinstance(o, float) else str(o),
)
def test_descending_the_forget_loss_raises_the_forget_nll(objective, lr, smoke_target, forget_batch):
    """On the trained smoke target (a random model is already near uniform: nothing to forget)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smoke_target).train()
    objective.setup(model)
    reference = frozen_copy(model)
    before = forget_nll(model, forget_batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(5):
        opt.zero_grad()
        objective.loss(model, forget_batch, reference).backward()
        opt.step()
    assert forget_nll(model, forget_batch) > before + 0.05


@pytest.mark.parametrize("objective", [NLL(), KL(), EmbedDiff(layer=0)], ids=lambda o: type(o).__name__)
def test_retain_losses_are_minimal_at_the_reference_or_fall(objective, synthetic_tokenizer_dir, forget_batch):
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    reference = frozen_copy(model)
    loss = objective.loss(model, forget_batch, reference)
    if isinstance(objective, (KL, EmbedDiff)):
        assert loss.item() == pytest.approx(0.0, abs=1e-6)  # π_θ = π_ref at the start
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            objective.loss(model, forget_batch, None).backward()
            opt.step()
        assert objective.loss(model, forget_batch, None).item() < loss.item()


def test_reference_needing_objectives_fail_clearly_without_it(synthetic_tokenizer_dir, forget_batch):
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    for objective in (NPO(), KL(), EmbedDiff(layer=0)):
        with pytest.raises(RuntimeError, match="needs the frozen reference model"):
            objective.loss(model, forget_batch, None)


def test_layer_capture_matches_hidden_states(synthetic_tokenizer_dir, forget_batch):
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    with capture_layer_output(model, 0) as store:
        out = model(
            input_ids=forget_batch["input_ids"],
            attention_mask=forget_batch["attention_mask"],
            output_hidden_states=True,
        )
    torch.testing.assert_close(store["hidden"], out.hidden_states[1])
    assert len(decoder_layers(model)) == 2
    with pytest.raises(ValueError, match="out of range"):
        with capture_layer_output(model, 5):
            pass


def test_rmu_changes_only_regex_selected_parameters(synthetic_tokenizer_dir, pairs):
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    before = weights(model)
    m = UnlearningModule(
        ModelSetup(model, trainable_parameters=r"layers\.(0|1)\.mlp\.down_proj"),
        RMU(layer=1, steering_coeff=5.0),
        EmbedDiff(layer=1),
        SAGO(retain_weight=1.0),
        optimizer=sgd(0.5),
    )
    fit(m, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=3)
    after = weights(m.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert m.reference is not None and "reference" not in dict(m.named_children())
    assert not any(k.startswith("reference") for k in m.state_dict())


def test_precomputed_reference_npo_equals_live_reference_npo(synthetic_tokenizer_dir, pairs):
    def run(precompute):
        m = UnlearningModule(
            make_model(synthetic_tokenizer_dir),
            NPO(beta=0.1, precompute_reference=precompute),
            NLL(),
            SAGO(),
            optimizer=sgd(0.5),
            grad_buffer_dtype="param",
        )
        fit(m, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=4, precision="64-true")
        return m

    live, pre = run(False), run(True)
    assert live.reference is not None and pre.reference is None  # no reference model kept in memory
    for k, v in weights(live.model).items():
        torch.testing.assert_close(weights(pre.model)[k], v, rtol=0, atol=1e-9)
