"""The engine's correctness anchors: manual == automatic, accumulation == big batch,
resume == uninterrupted, NaN handling, memory of the buffers, precision and strategy checks."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch

from lit_unlearn.adapters import LoRA
from lit_unlearn.callbacks import NonFiniteGuard, engine_callbacks
from lit_unlearn.engine.buffers import TwoTaskGradients
from lit_unlearn.engine.model_setup import ModelSetup
from lit_unlearn.engine.module import UnlearningModule
from lit_unlearn.objectives import NLL, NPO, GradientAscent, SimNPO
from lit_unlearn.objectives.functional import mean_nll
from lit_unlearn.synthesis import RULES, SAGO, WeightedSum
from tests.engine_helpers import (
    assert_same_weights,
    fit,
    interrupted_and_uninterrupted,
    make_dm,
    make_model,
    relative_difference,
    sgd,
    weights,
)
from tests.synthesis.test_properties import make_rule


class SummedLoss(L.LightningModule):
    """Automatic optimization of γ L_f + α L_r: the reference the engine must reproduce."""

    def __init__(self, model, gamma, alpha, lr):
        super().__init__()
        self.model, self.gamma, self.alpha, self.lr = model, gamma, alpha, lr

    def training_step(self, batch, batch_idx):
        f, r = batch["forget"], batch["retain"]
        lf = -mean_nll(
            self.model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits, f["labels"]
        )
        lr_ = mean_nll(
            self.model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits, r["labels"]
        )
        return self.gamma * lf + self.alpha * lr_

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)


def test_weighted_sum_manual_equals_automatic_summed_loss(synthetic_tokenizer_dir, pairs):
    gamma, alpha = 0.7, 1.3
    auto = SummedLoss(make_model(synthetic_tokenizer_dir), gamma, alpha, lr=0.1)
    fit(auto, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=5, precision="64-true")
    manual = UnlearningModule(
        make_model(synthetic_tokenizer_dir),
        GradientAscent(),
        NLL(),
        WeightedSum(forget_weight=gamma, retain_weight=alpha),
        optimizer=sgd(0.1),
        grad_buffer_dtype="param",
    )
    fit(manual, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=5, precision="64-true")
    before = weights(make_model(synthetic_tokenizer_dir))
    after = weights(manual.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert_same_weights(weights(auto.model), after)


def _accumulation_pair(tokenizer_dir, data, rule, forget_objective=None, retain_objective=None):
    def run(batch, k):
        m = UnlearningModule(
            make_model(tokenizer_dir),
            forget_objective or GradientAscent(),
            retain_objective or NLL(),
            copy.deepcopy(rule),  # a stateful rule (GRU) starts each run afresh
            optimizer=sgd(0.2),
            accumulate_grad_batches=k,
            grad_buffer_dtype="param",
        )
        fit(m, make_dm(tokenizer_dir, *data, batch=batch), max_steps=3, precision="64-true")
        return weights(m.model)

    return run(batch=2, k=2), run(batch=4, k=1)


@pytest.mark.parametrize("rule_cls", RULES, ids=lambda c: c.__name__)
def test_k_micro_batches_equal_one_step_at_k_times_the_batch_with_variable_lengths(
    synthetic_tokenizer_dir, varlen, rule_cls
):
    """Answers of 1-18 words: per-micro-batch token means would differ by ~0.8 of the update
    (measured on the earlier engine); the exact normalisation agrees to float64 rounding."""
    micro, big = _accumulation_pair(synthetic_tokenizer_dir, varlen, make_rule(rule_cls, retain_weight=0.5))
    assert relative_difference(micro, big, weights(make_model(synthetic_tokenizer_dir))) <= 1e-6


@pytest.mark.parametrize("objective_cls", [NPO, SimNPO], ids=lambda c: c.__name__)
def test_per_sequence_objectives_are_normalised_by_sequences(synthetic_tokenizer_dir, varlen, objective_cls):
    micro, big = _accumulation_pair(
        synthetic_tokenizer_dir, varlen, SAGO(retain_weight=0.5), objective_cls(beta=0.5)
    )
    assert relative_difference(micro, big, weights(make_model(synthetic_tokenizer_dir))) <= 1e-6


def test_logged_losses_are_the_means_of_the_effective_batch(synthetic_tokenizer_dir, varlen):
    from lit_unlearn.data.collate import pad_examples

    logged = []
    for batch, k in ((2, 2), (4, 1)):
        m = UnlearningModule(
            make_model(synthetic_tokenizer_dir),
            synthesizer=SAGO(),
            optimizer=sgd(0.1),
            accumulate_grad_batches=k,
            grad_buffer_dtype="param",
        )
        trainer = fit(
            m, make_dm(synthetic_tokenizer_dir, *varlen, batch=batch), max_steps=1, precision="64-true"
        )
        logged.append(
            (
                float(trainer.callback_metrics["train/forget_loss"]),
                float(trainer.callback_metrics["train/retain_loss"]),
            )
        )
    dm = make_dm(synthetic_tokenizer_dir, *varlen, batch=4)
    dm.setup("fit")
    f_idx, r_idx = next(iter(dm.make_sampler(0, 1)))
    model = make_model(synthetic_tokenizer_dir)
    expected = []
    for examples, sign in ((dm.forget_examples, -1), (dm.retain_examples, 1)):
        idx = f_idx if sign < 0 else r_idx
        b = pad_examples([examples[i] for i in idx], dm.tokenizer.pad_token_id)
        with torch.no_grad():
            expected.append(
                sign
                * mean_nll(
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
                ).item()
            )
    # logged in float32; with these lengths a mean of per-micro-batch means is a different number
    assert logged[0] == pytest.approx(tuple(expected), rel=1e-6)
    assert logged[1] == pytest.approx(tuple(expected), rel=1e-6)


def test_fp32_buffer_next_to_bf16_parameters_with_accumulation(synthetic_tokenizer_dir, pairs):
    """copy mode (bf16-true + fp32 forget buffer): runs, stays finite, and moves the weights."""
    m = UnlearningModule(
        make_model(synthetic_tokenizer_dir, torch.float32),
        synthesizer=SAGO(),
        optimizer=sgd(0.1),
        accumulate_grad_batches=2,
    )
    fit(m, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=2, precision="bf16-true")
    assert m.grads is not None and m.grads.mode == "copy" and m.grads.retain_flat is not None
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in m.model.parameters())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_precisions_run_and_log(synthetic_tokenizer_dir, pairs, precision):
    m = UnlearningModule(
        make_model(synthetic_tokenizer_dir, torch.float32),
        synthesizer=SAGO(),
        optimizer=sgd(0.1),
        gradient_clip_val=1.0,
    )
    trainer = fit(m, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=2, precision=precision)
    logged = trainer.callback_metrics
    for key in (
        "train/forget_loss",
        "train/retain_loss",
        "train/lr",
        "train/grad_cosine",
        "train/conflict_fraction",
        "train/update_retain_cosine",
        "train/update_norm",
    ):
        assert key in logged and math.isfinite(float(logged[key])), key
    assert float(logged["train/update_retain_cosine"]) >= -1e-6  # SAGO's guarantee, on u itself


def test_train_metrics_are_indexed_by_optimizer_steps(synthetic_tokenizer_dir, pairs, tmp_path):
    """With accumulation, train and val curves share one x-axis: completed optimizer steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = UnlearningModule(
        make_model(synthetic_tokenizer_dir, torch.float32),
        synthesizer=SAGO(),
        optimizer=sgd(0.1),
        accumulate_grad_batches=2,
    )
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="", version="")
    fit(m, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=4, logger=logger, log_every_n_steps=2)
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/forget_loss")] == [2, 4]
    assert [e.step for e in ea.Scalars("train/update_retain_cosine")] == [2, 4]
    assert all(e.value >= -1e-6 for e in ea.Scalars("train/update_retain_cosine"))


class FSDPStrategy:  # stands in for Lightning's, which refuses CPU before our check could run
    pass


class _Connector:
    use_distributed_sampler = True


@pytest.mark.parametrize(
    ("strategy", "precision", "world", "message"),
    [
        (
            FSDPStrategy(),
            "32-true",
            1,
            "FSDPStrategy is not supported; for sharded training use ModelParallelStrategy",
        ),
        (object(), "16-mixed", 1, "16-mixed is not supported"),
        (object(), "32-true", 2, "use_distributed_sampler false"),
    ],
)
def test_unsupported_strategy_precision_and_sampler_are_refused(strategy, precision, world, message):
    from types import SimpleNamespace

    from lit_unlearn.engine.checks import check_supported

    trainer = SimpleNamespace(
        strategy=strategy, precision=precision, world_size=world, _accelerator_connector=_Connector()
    )
    with pytest.raises(ValueError, match=message):
        check_supported(trainer)


def test_module_arguments_are_validated(synthetic_tokenizer_dir):
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    with pytest.raises(ValueError, match="--model.accumulate_grad_batches"):
        UnlearningModule(model, accumulate_grad_batches=0)
    with pytest.raises(
        ValueError, match="--model.network.trainable_parameters 'nothing_matches' matches no parameter"
    ):
        UnlearningModule(ModelSetup(model, trainable_parameters="nothing_matches"))


@pytest.mark.parametrize("rank", [None, 4], ids=["full", "lora"])
def test_resume_from_checkpoint_equals_uninterrupted(synthetic_tokenizer_dir, pairs, tmp_path, rank):
    """Bit-identical weights (with LoRA: the adapters and the untouched base)."""

    def module():
        return UnlearningModule(
            ModelSetup(make_model(synthetic_tokenizer_dir), adapter=LoRA(rank=rank) if rank else None),
            synthesizer=SAGO(retain_weight=0.5),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
            warmup_ratio=0.3,
            lr_decay="linear",
            grad_buffer_dtype="param",
        )

    full, resumed = interrupted_and_uninterrupted(
        module, lambda: make_dm(synthetic_tokenizer_dir, *pairs), tmp_path, every=3, steps=7
    )
    assert_same_weights(weights(full.model), weights(resumed.model), atol=0)


class NaNOnce(GradientAscent):
    """Returns NaN on chosen calls: the injected failure."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0

    def loss_terms(self, model, batch, reference):
        self.calls += 1
        total, count = super().loss_terms(model, batch, reference)
        return (total * float("nan") if self.calls in self.bad_calls else total), count


def test_nan_step_is_skipped_counted_and_leaves_the_model_untouched(synthetic_tokenizer_dir, pairs):
    m = UnlearningModule(make_model(synthetic_tokenizer_dir, torch.float32), NaNOnce({1}), optimizer=sgd(0.1))
    before = weights(m.model)
    dm = make_dm(synthetic_tokenizer_dir, *pairs)
    trainer = L.Trainer(
        max_steps=1,
        limit_train_batches=1,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        callbacks=engine_callbacks(),
    )
    trainer.fit(m, dm)
    assert m.state.skipped_steps == 1 and trainer.global_step == 0
    assert m.last_outcome is not None and m.last_outcome.skipped
    assert_same_weights(before, weights(m.model), atol=0)
    m2 = UnlearningModule(
        make_model(synthetic_tokenizer_dir, torch.float32), NaNOnce({2}), optimizer=sgd(0.1)
    )
    fit(m2, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=3)
    assert m2.state.skipped_steps == 1 and m2.state.consecutive_skipped == 0  # recovered, then 3 good steps


def test_consecutive_bad_steps_stop_with_a_clear_error(synthetic_tokenizer_dir, pairs):
    m = UnlearningModule(
        make_model(synthetic_tokenizer_dir, torch.float32),
        NaNOnce(range(1, 100)),
        optimizer=sgd(0.1),
    )
    with pytest.raises(RuntimeError, match="3 consecutive optimizer steps had NaN/inf"):
        fit(m, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=5, callbacks=[NonFiniteGuard(3)])


def test_one_extra_parameter_sized_buffer(synthetic_tokenizer_dir):
    model = make_model(synthetic_tokenizer_dir, torch.float32)
    params = list(model.parameters())
    grads = TwoTaskGradients(params, torch.float32, accumulate=4)
    assert grads.mode == "swap"
    assert grads.extra_bytes() == sum(p.numel() * 4 for p in params)
    assert all(p.grad.data_ptr() >= grads.grad_flat.data_ptr() for p in params)
    grads.begin("forget")
    assert params[0].grad.data_ptr() == grads.forget_flat.data_ptr()
    grads.begin("retain")
    assert params[0].grad.data_ptr() == grads.grad_flat.data_ptr()


def test_export_callback_saves_pretrained_at_end_of_fit(synthetic_tokenizer_dir, pairs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_unlearn.callbacks.export import ExportModel

    m = UnlearningModule(make_model(synthetic_tokenizer_dir, torch.float32), optimizer=sgd(0.1))
    export = ExportModel()
    fit(
        m,
        make_dm(synthetic_tokenizer_dir, *pairs),
        max_steps=1,
        default_root_dir=str(tmp_path),
        callbacks=[export],
    )
    assert export.path == str(tmp_path / "unlearned_model")
    again = AutoModelForCausalLM.from_pretrained(export.path)
    AutoTokenizer.from_pretrained(export.path)
    assert_same_weights(weights(m.model), weights(again), atol=0)


def test_sequences_longer_than_the_model_context_are_refused(synthetic_tokenizer_dir, pairs):
    m = UnlearningModule(make_model(synthetic_tokenizer_dir, torch.float32))  # 64 positions
    dm = make_dm(synthetic_tokenizer_dir, *pairs)
    dm.max_length = 128
    with pytest.raises(
        ValueError, match=r"--data.max_length=128 exceeds the model's context \(64 positions\)"
    ):
        fit(m, dm, max_steps=1)


class CountingSAGO(SAGO):
    """A stateful rule (test-only): counts its calls and keeps the count in checkpoints."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_synthesizer_state_survives_a_checkpoint(synthetic_tokenizer_dir, pairs, tmp_path):
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    m = UnlearningModule(make_model(synthetic_tokenizer_dir), synthesizer=CountingSAGO(), optimizer=sgd(0.1))
    fit(
        m,
        make_dm(synthetic_tokenizer_dir, *pairs),
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[ckpt_cb],
    )
    resumed = UnlearningModule(
        make_model(synthetic_tokenizer_dir), synthesizer=CountingSAGO(), optimizer=sgd(0.1)
    )
    fit(
        resumed,
        make_dm(synthetic_tokenizer_dir, *pairs),
        max_steps=3,
        ckpt_path=str(next(tmp_path.glob("*.ckpt"))),
    )
    assert resumed.synthesizer.calls == 3  # 2 restored + 1 new


def test_an_injected_scheduler_refuses_the_built_in_schedule_flags(synthetic_tokenizer_dir):
    from lit_unlearn.errors import UserError

    def factory(opt):
        return torch.optim.lr_scheduler.ConstantLR(opt)

    with pytest.raises(UserError, match="--model.lr_scheduler"):
        UnlearningModule(make_model(synthetic_tokenizer_dir), lr_scheduler=factory, warmup_ratio=0.1)
    UnlearningModule(make_model(synthetic_tokenizer_dir), lr_scheduler=factory)  # alone it is fine


def test_validation_nll_is_the_token_mean_of_the_whole_split(synthetic_tokenizer_dir, varlen):
    from lit_unlearn.data import QAPairs
    from lit_unlearn.data.collate import pad_examples

    model = make_model(synthetic_tokenizer_dir)
    m = UnlearningModule(model)
    dm = make_dm(synthetic_tokenizer_dir, *varlen, val_forget=QAPairs(varlen[0]), eval_batch_size=3)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        precision="64-true",
    )
    (metrics,) = trainer.validate(m, dm)
    everything = pad_examples(dm.val_examples["forget"], dm.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=everything["input_ids"], attention_mask=everything["attention_mask"]).logits
    assert metrics["val/forget_nll"] == pytest.approx(mean_nll(logits, everything["labels"]).item(), rel=1e-6)


class ReportingNLL(NLL):
    """NLL that also reports its own loss sum and its unit count as metrics."""

    def loss_terms(self, model, batch, reference):
        total, count = super().loss_terms(model, batch, reference)
        return total, count, {"copy": total.detach(), "units": count.double()}


def test_objective_metrics_are_effective_batch_means(synthetic_tokenizer_dir, varlen):
    """Metrics an objective returns are summed like its loss over micro-batches of different
    lengths and divided by the units of the whole step: a copy of the loss equals the logged
    loss, and the unit count averages to exactly 1."""
    m = UnlearningModule(
        make_model(synthetic_tokenizer_dir, torch.float64),
        retain_objective=ReportingNLL(),
        optimizer=sgd(0.05),
        accumulate_grad_batches=2,
    )
    trainer = fit(m, make_dm(synthetic_tokenizer_dir, *varlen, batch=2), max_steps=2, precision="64-true")
    metrics = trainer.callback_metrics
    assert metrics["train/retain_units"].item() == 1.0
    assert metrics["train/retain_copy"].item() == pytest.approx(metrics["train/retain_loss"].item(), rel=1e-6)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_built_in_schedule_is_the_hf_trainers_linear_warmup(synthetic_tokenizer_dir, pairs, accumulate):
    """warmup_ratio 0.1 of 10 optimizer steps: ceil(1.0) = 1 warm-up step starting at lr 0, then
    linear decay to 0 at step 10, counted in optimizer steps whatever the accumulation."""
    seen: list[float] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % accumulate == 0:
                seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    m = UnlearningModule(
        make_model(synthetic_tokenizer_dir),
        optimizer=sgd(1e-3),
        warmup_ratio=0.1,
        lr_decay="linear",
        accumulate_grad_batches=accumulate,
    )
    fit(m, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=10, callbacks=[RecordLR()])
    expected = [0.0] + [1e-3 * (10 - s) / 9 for s in range(1, 10)]
    assert seen == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("synthesizer", [WeightedSum(), SAGO(retain_weight=0.5)])
def test_activation_checkpointing_gives_the_same_update(synthetic_tokenizer_dir, varlen, synthesizer):
    """Recomputing each layer in both task backward passes changes memory, not the update."""

    def train(checkpointing: bool) -> UnlearningModule:
        m = UnlearningModule(
            ModelSetup(
                make_model(synthetic_tokenizer_dir, torch.float64), activation_checkpointing=checkpointing
            ),
            synthesizer=copy.deepcopy(synthesizer),
            optimizer=sgd(0.05),
            accumulate_grad_batches=2,
        )
        fit(m, make_dm(synthetic_tokenizer_dir, *varlen, batch=2), max_steps=3, precision="64-true")
        return m

    plain, checkpointed = train(False), train(True)
    assert checkpointed.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    assert_same_weights(weights(plain.model), weights(checkpointed.model), atol=1e-12)


@pytest.mark.parametrize("buffer", ["float32", "param"])
def test_resume_is_exact_in_both_buffer_modes(synthetic_tokenizer_dir, varlen, tmp_path, buffer):
    """float32 next to float64 weights is 'copy' mode (as an fp32 buffer beside bf16 weights on a
    GPU). Restoring a checkpoint replaced ``.grad`` between fit start and the first step: copy
    mode used to take that stray gradient for one step (the resumed update was 2x the
    uninterrupted one here)."""

    def module():
        return UnlearningModule(
            make_model(synthetic_tokenizer_dir), optimizer=sgd(0.05), grad_buffer_dtype=buffer
        )

    full, resumed = interrupted_and_uninterrupted(
        module, lambda: make_dm(synthetic_tokenizer_dir, *varlen), tmp_path, every=2, steps=4
    )
    assert full.grads is not None and full.grads.mode == ("copy" if buffer == "float32" else "swap")
    assert_same_weights(weights(full.model), weights(resumed.model), atol=0)


@pytest.mark.parametrize("rank", [None, 4], ids=["full", "lora"])
def test_diagnostics_steps_carry_per_layer_geometry(synthetic_tokenizer_dir, pairs, rank):
    """Every trainable tensor in its block × module-type cell (adapters under the module they
    adapt), on diagnostics steps only."""
    module = UnlearningModule(
        ModelSetup(make_model(synthetic_tokenizer_dir), adapter=LoRA(rank=rank) if rank else None),
        synthesizer=SAGO(retain_weight=0.5),
        optimizer=sgd(0.05),
        diagnostics_every_n_steps=2,
    )
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["outcome"])

    fit(module, make_dm(synthetic_tokenizer_dir, *pairs), max_steps=4, callbacks=[Record()])
    assert [o.layer_geometry is not None for o in seen] == [False, True, False, True]
    geo = seen[-1].layer_geometry
    if rank:  # LoRA on every attention and MLP projection of both blocks, nothing outside them
        assert geo.layers == ("0", "1")
        assert geo.types == ("q", "k", "v", "o", "gate", "up", "down")
    else:
        assert geo.layers == ("0", "1", "no layer")
        assert geo.types == ("embedding", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head")
        assert math.isnan(geo.cells["grad_cosine"][0][0])  # no embedding inside a block
    assert all(math.isfinite(v) for row in geo.by_layer.values() for v in row)
    assert len(module.layer_grid.cells) == len(module._trainable())
