"""RunCheckpoint: last.ckpt on errors at a step boundary (and resuming from it is exact); never
for a collapsed model; the collapse guard itself."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from lit_unlearn.checkpointing import RunCheckpoint
from lit_unlearn.errors import TrainingDiverged
from lit_unlearn.export import ExportModel
from lit_unlearn.module import UnlearningModule
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


def _with_baseline(module: UnlearningModule, first: float) -> UnlearningModule:
    assert not module._diverged(torch.tensor(first))  # no baseline yet: never trips
    module._baseline = torch.tensor(first)  # what the first finite optimizer step records
    return module


def test_collapse_bound_is_near_a_uniform_prediction_and_only_there(synthetic_tokenizer_dir):
    module = _with_baseline(
        UnlearningModule(make_model(synthetic_tokenizer_dir), retain_objective=NLL(), collapse_threshold=0.8),
        0.001,
    )
    ln_v = math.log(module.model.config.vocab_size)
    assert not module._diverged(torch.tensor(2.0))  # 2000 x the start, still far from uniform: not collapse
    assert not module._diverged(torch.tensor(0.79 * ln_v))
    assert module._diverged(torch.tensor(0.81 * ln_v))
    untrained = _with_baseline(
        UnlearningModule(make_model(synthetic_tokenizer_dir), collapse_threshold=0.8), 0.95 * ln_v
    )
    assert not untrained._diverged(torch.tensor(1.8 * ln_v))  # < 2 x its start
    assert untrained._diverged(torch.tensor(2.0 * ln_v))
    kl = _with_baseline(
        UnlearningModule(make_model(synthetic_tokenizer_dir), retain_objective=KL(), collapse_threshold=0.8),
        0.0,
    )
    assert not kl._diverged(torch.tensor(50.0))  # no uniform loss: not checked
    off = _with_baseline(UnlearningModule(make_model(synthetic_tokenizer_dir), collapse_threshold=None), 0.1)
    assert not off._diverged(torch.tensor(100.0))


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


def test_one_spiking_step_does_not_stop_the_run_but_a_lasting_collapse_does(synthetic_tokenizer_dir):
    """A hard batch can spike the retain loss for one step (seen with 2 x 2 batches of 1-18 word
    answers: 4.6 -> 9.7 -> 5.1); only `collapse_patience` steps in a row stop the run."""
    module = UnlearningModule(make_model(synthetic_tokenizer_dir), collapse_patience=3)
    ln_v = math.log(module.model.config.vocab_size)
    module._baseline = torch.tensor(0.5)
    for loss in (5.0, 0.6, 5.0, 5.0):  # two spikes, never three in a row
        module._check_collapse(bool(module._diverged(torch.tensor(loss))), torch.tensor(loss))
    with pytest.raises(TrainingDiverged, match="for 3 optimizer steps"):
        module._check_collapse(bool(module._diverged(torch.tensor(ln_v))), torch.tensor(ln_v))
