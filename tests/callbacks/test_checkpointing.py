"""RunCheckpoint: last.ckpt on errors at a step boundary (and resuming from it is exact); never
for a collapsed model; the collapse guard itself."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from lit_unlearn.callbacks import CollapseGuard
from lit_unlearn.callbacks.checkpointing import RunCheckpoint
from lit_unlearn.callbacks.export import ExportModel
from lit_unlearn.engine import EngineState, StepOutcome
from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.errors import TrainingDiverged
from lit_unlearn.objectives import KL, NLL
from lit_unlearn.synthesis import SAGO
from tests.engine_helpers import assert_same_weights, make_dm, make_model, weights


class FailAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("injected failure")


def _module(tokenizer_dir):
    return UnlearningModule(
        make_model(tokenizer_dir),
        synthesizer=SAGO(retain_weight=0.5),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        accumulate_grad_batches=2,
        grad_buffer_dtype="param",
    )


def _trainer(tmp_path, *callbacks, max_steps=6):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        precision="64-true",
        callbacks=[*callbacks],
        default_root_dir=str(tmp_path),
    )


def test_an_error_at_a_step_boundary_leaves_a_last_ckpt_that_resumes_exactly(
    synthetic_tokenizer_dir, varlen, tmp_path
):
    full = _module(synthetic_tokenizer_dir)
    _trainer(tmp_path / "full", RunCheckpoint(every_n_train_steps=0, dirpath=str(tmp_path / "full"))).fit(
        full, make_dm(synthetic_tokenizer_dir, *varlen)
    )

    broken = _module(synthetic_tokenizer_dir)
    ckpt_cb = RunCheckpoint(every_n_train_steps=0, dirpath=str(tmp_path / "cut"))
    with pytest.raises(RuntimeError, match="injected failure"):
        _trainer(tmp_path / "cut", ckpt_cb, FailAt(3)).fit(broken, make_dm(synthetic_tokenizer_dir, *varlen))
    last = tmp_path / "cut" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3

    resumed = _module(synthetic_tokenizer_dir)
    _trainer(
        tmp_path / "resumed", RunCheckpoint(every_n_train_steps=0, dirpath=str(tmp_path / "resumed"))
    ).fit(resumed, make_dm(synthetic_tokenizer_dir, *varlen), ckpt_path=str(last))
    assert_same_weights(weights(full.model), weights(resumed.model), atol=0)


def test_a_diverged_run_does_not_overwrite_the_last_good_checkpoint(
    synthetic_tokenizer_dir, varlen, tmp_path
):
    module = _module(synthetic_tokenizer_dir)
    ckpt_cb = RunCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path))

    class Diverge(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                raise TrainingDiverged("collapsed")

    with pytest.raises(TrainingDiverged):
        _trainer(tmp_path, ckpt_cb, Diverge()).fit(module, make_dm(synthetic_tokenizer_dir, *varlen))
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2


def outcome(retain_loss: float, baseline: float, uniform: float | None, step: int = 1) -> StepOutcome:
    """A step as the engine reports it: the first applied step's retain loss is the baseline."""
    return StepOutcome(
        step, 0.0, retain_loss, False, False, 0.1, EngineState(retain_baseline=baseline), uniform
    )


def test_collapse_bound_is_near_a_uniform_prediction_and_only_there(synthetic_tokenizer_dir):
    model = make_model(synthetic_tokenizer_dir)
    ln_v = NLL().uniform_loss(model)
    assert ln_v == pytest.approx(math.log(model.config.vocab_size))
    guard = CollapseGuard(threshold=0.8)
    trained = guard.bound(outcome(2.0, 0.001, ln_v))
    assert trained == pytest.approx(0.8 * ln_v)  # 2000 x the start, still far from uniform: no collapse
    assert 0.79 * ln_v < trained < 0.81 * ln_v
    untrained = guard.bound(outcome(1.8 * ln_v, 0.95 * ln_v, ln_v))
    assert untrained == pytest.approx(1.9 * ln_v)  # twice its start: 1.8 ln V is not collapse, 2 ln V is
    assert KL().uniform_loss(model) is None
    assert guard.bound(outcome(50.0, 0.0, None)) is None  # no uniform loss: not checked
    assert CollapseGuard(threshold=None).bound(outcome(100.0, 0.1, ln_v)) is None


def test_a_failing_final_save_names_last_ckpt_and_resuming_from_it_saves(
    synthetic_tokenizer_dir, varlen, tmp_path, monkeypatch
):
    from lit_unlearn.errors import SaveFailed

    module = UnlearningModule(
        make_model(synthetic_tokenizer_dir), optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(module.model, "save_pretrained", broken)
    with pytest.raises(SaveFailed, match="last.ckpt") as err:
        _trainer(tmp_path / "a", RunCheckpoint(every_n_train_steps=0), ExportModel(), max_steps=3).fit(
            module, make_dm(synthetic_tokenizer_dir, *varlen)
        )
    ckpt = str(err.value).rsplit("--ckpt_path ", 1)[1].split(" ")[0]
    assert not list((tmp_path / "a").rglob("unlearned_model")) and not list(
        (tmp_path / "a").rglob(".unlearned_model-*")
    )
    again = UnlearningModule(
        make_model(synthetic_tokenizer_dir), optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    export = ExportModel()
    _trainer(tmp_path / "b", RunCheckpoint(every_n_train_steps=0), export, max_steps=3).fit(
        again, make_dm(synthetic_tokenizer_dir, *varlen), ckpt_path=ckpt
    )
    assert export.path is not None and os.path.isdir(export.path)
    assert_same_weights(weights(module.model), weights(again.model), atol=0)


def test_one_spiking_step_does_not_stop_the_run_but_a_lasting_collapse_does():
    """A hard batch can spike the retain loss for one step (seen with 2 x 2 batches of 1-18 word
    answers: 4.6 -> 9.7 -> 5.1); only ``patience`` steps in a row stop the run."""
    ln_v = math.log(100)  # bound: max(2 x 0.5, 0.8 ln V) = 3.68
    guard = CollapseGuard(threshold=0.8, patience=3)
    for step, loss in enumerate((5.0, 0.6, 5.0, 5.0), 1):  # two spikes, never three in a row
        guard.observe(outcome(loss, 0.5, ln_v, step))
    assert guard.state_dict() == {"steps_above": 2}  # checkpointed: a resume continues the count
    with pytest.raises(TrainingDiverged, match="for 3 optimizer steps"):
        guard.observe(outcome(ln_v, 0.5, ln_v, 5))


def test_collapse_guard_stops_a_real_run_before_the_collapsed_update(
    synthetic_tokenizer_dir, varlen, tmp_path
):
    """Through the engine: the guard sees the outcome in on_before_optimizer_step, so the
    offending update is never applied and no checkpoint is written for it."""
    module = UnlearningModule(
        make_model(synthetic_tokenizer_dir), optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    guard = CollapseGuard(threshold=1e-6, patience=2)  # any loss above 2 x the first counts
    seen = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(weights(pl_module.model))

    module.state.retain_baseline = 1e-9  # as if restored: every step is above 2 x the baseline
    with pytest.raises(TrainingDiverged, match="for 2 optimizer steps"):
        _trainer(tmp_path, Record(), guard).fit(module, make_dm(synthetic_tokenizer_dir, *varlen))
    assert module.global_step == 1  # the second step was refused before its update
    assert_same_weights(seen[-1], weights(module.model), atol=0)
