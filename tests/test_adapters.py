"""LoRA unlearning: only adapters train, buffers are adapter-sized, the reference is the base with
adapters off, the no-change guard, save -> reload (adapter and merged); resume with adapters is in tests/test_module.py."""

from __future__ import annotations

import pytest
import torch

from lit_unlearn.adapters import AdaptersOff, LoRA
from lit_unlearn.callbacks.export import ExportModel
from lit_unlearn.engine.model_setup import ModelSetup
from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.errors import TrainingDiverged
from lit_unlearn.models import load_causal_lm
from lit_unlearn.objectives import NPO, RMU, EmbedDiff
from lit_unlearn.synthesis import SAGO
from tests.engine_helpers import (
    fit,
    make_dm,
    make_model,
    sgd,
)


def _base_name(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def test_only_adapters_train_and_the_task_buffers_are_adapter_sized(synthetic_tokenizer_dir, varlen):
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = UnlearningModule(ModelSetup(model, adapter=LoRA(rank=4)), synthesizer=SAGO(), optimizer=sgd(0.5))
    fit(module, make_dm(synthetic_tokenizer_dir, *varlen), max_steps=3)
    params = dict(module.model.named_parameters())
    base = {_base_name(n): p for n, p in params.items() if "lora_" not in n}
    assert base.keys() == before.keys()
    assert all(torch.equal(base[n], before[n]) for n in before)  # base weights bit-identical
    lora_b = [p for n, p in params.items() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # lora_B left zero: it trained
    adapters = sum(p.numel() for p in params.values() if p.requires_grad)
    assert module.grads is not None and module.grads.forget_flat.numel() == adapters
    assert adapters < sum(p.numel() for p in before.values()) / 4


def test_the_reference_is_the_base_with_adapters_off_not_a_copy(synthetic_tokenizer_dir, varlen):
    """NPO's log-ratio starts at exactly 0 (fresh adapters are the identity) and no second copy of
    the weights exists; RMU's layer hooks work through it too."""
    module = UnlearningModule(
        ModelSetup(make_model(synthetic_tokenizer_dir, torch.float32), adapter=LoRA(rank=4)),
        NPO(beta=0.1),
        optimizer=sgd(0.1),
    )
    trainer = fit(module, make_dm(synthetic_tokenizer_dir, *varlen), max_steps=1, log_every_n_steps=1)
    assert isinstance(module.reference, AdaptersOff) and module.reference.adapted is module.model
    assert abs(trainer.callback_metrics["train/forget_log_ratio"].item()) < 1e-6
    rmu = UnlearningModule(
        ModelSetup(make_model(synthetic_tokenizer_dir, torch.float32), adapter=LoRA(rank=4)),
        RMU(layer=1, steering_coeff=4.0),
        EmbedDiff(layer=1),
        optimizer=sgd(0.1),
    )
    fit(rmu, make_dm(synthetic_tokenizer_dir, *varlen), max_steps=2)
    assert rmu.state.skipped_steps == 0


def test_a_run_whose_adapters_do_not_move_stops(synthetic_tokenizer_dir, varlen):
    """Training only lora_A (its gradient is 0 while lora_B is 0) is the silent no-op of
    open-unlearning #178: it must fail after the first step, not save an unchanged model."""
    module = UnlearningModule(
        ModelSetup(
            make_model(synthetic_tokenizer_dir, torch.float32),
            adapter=LoRA(rank=4),
            trainable_parameters="lora_A",
        ),
        optimizer=sgd(0.1),
    )
    with pytest.raises(TrainingDiverged, match="no adapter weight changed"):
        fit(module, make_dm(synthetic_tokenizer_dir, *varlen), max_steps=3)


def test_activation_checkpointing_still_trains_the_adapters(synthetic_tokenizer_dir, varlen):
    module = UnlearningModule(
        ModelSetup(
            make_model(synthetic_tokenizer_dir, torch.float32),
            adapter=LoRA(rank=4),
            activation_checkpointing=True,
        ),
        optimizer=sgd(0.5),
    )
    fit(module, make_dm(synthetic_tokenizer_dir, *varlen), max_steps=2)  # the guard would stop it
    assert any(p.abs().max() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)


def test_adapter_and_merged_model_reload_with_the_same_logits(
    smoke_target, synthetic_tokenizer_dir, varlen, tmp_path, mc_task
):
    from transformers import AutoModelForCausalLM

    from lit_unlearn.eval.harness import evaluate_saved

    module = UnlearningModule(
        ModelSetup(smoke_target, adapter=LoRA(rank=4, merge_on_save=True)), optimizer=sgd(0.5)
    )
    export = ExportModel()
    fit(
        module,
        make_dm(synthetic_tokenizer_dir, *varlen),
        max_steps=2,
        default_root_dir=str(tmp_path),
        callbacks=[export],
    )
    assert export.path is not None
    ids = torch.randint(4, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        live = module.model.eval()(input_ids=ids).logits
        adapter = load_causal_lm(export.path).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(f"{export.path}/merged").eval()(input_ids=ids).logits
    assert torch.allclose(adapter, live, atol=1e-5) and torch.allclose(merged, live, atol=1e-5)
    # lit-unlearn-eval (lm-eval through HFLM) scores either folder the same
    task_dir = mc_task[0]
    scores = [
        evaluate_saved(path, ["synthetic_mc"], include_path=task_dir)["synthetic_mc"]["acc"]
        for path in (export.path, f"{export.path}/merged")
    ]
    assert scores[0] == pytest.approx(scores[1])


def test_a_local_base_folder_is_recorded_absolute(smoke_target, monkeypatch):
    """Saved adapters name their base; a relative local path would only load from the same cwd."""
    import os

    monkeypatch.chdir(os.path.dirname(smoke_target))
    adapted = LoRA(rank=2).apply(load_causal_lm(os.path.basename(smoke_target)))
    assert adapted.peft_config["default"].base_model_name_or_path == os.path.realpath(smoke_target)
