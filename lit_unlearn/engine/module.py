"""UnlearningModule: Algorithm 1 — two task gradients per step, combined by a synthesizer.

Launch it through the CLI: ``lit-unlearn fit --config configs/debug/tiny.yaml [--model.synthesizer SAGO]``.

Per micro-batch: forget loss → backward into the forget buffer, retain loss → backward into the
retain buffer (``buffers.py``: buffers, dtype, normalisation, sync). At the accumulation boundary:
reduce over micro-batches and ranks → one :class:`StepOutcome` (one host sync) → skip (NaN/inf) or
synthesize → clip → step. The rest is injected: the network (``model_setup.py``), objectives,
synthesizer, and callbacks that read the outcome (guards, logging, checkpoints: ``callbacks/``).
Not supported: Lightning's ``fsdp``/DeepSpeed (use ``ModelParallelStrategy``, FSDP2) and ``16-mixed``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lit_unlearn.engine import checks
from lit_unlearn.engine.buffers import TASKS, Task, TwoTaskGradients, no_backward_sync
from lit_unlearn.engine.model_setup import ModelSetup
from lit_unlearn.engine.outcome import StepOutcome
from lit_unlearn.engine.state import EngineState, restore_engine, save_engine
from lit_unlearn.logs import describe
from lit_unlearn.models import drop_gathered_parameters
from lit_unlearn.objectives import NLL, GradientAscent, Objective
from lit_unlearn.objectives.base import split_terms
from lit_unlearn.objectives.functional import nll_terms
from lit_unlearn.schedule import lr_schedule
from lit_unlearn.synthesis import GeometryAccumulator, LayerGrid, Synthesizer, WeightedSum, layer_geometry


class UnlearningModule(L.LightningModule):
    """LLM unlearning as an asymmetric two-task problem (arXiv 2604.14808).

    Args:
        network: the causal LM and how it is prepared (``ModelSetup``: path, dtype, adapter, ...).
        forget_objective: the forget loss; descending it forgets.
        retain_objective: the retain loss.
        synthesizer: combines the two gradients (α: retain_weight, γ: forget_weight).
        optimizer: optimizer factory (default: AdamW, lr 1e-5, weight decay 0, as in the paper).
        lr_scheduler: scheduler factory, stepped per optimizer step; ``None``: warmup_ratio, lr_decay.
        warmup_ratio: share of steps (rounded up) warming up from lr 0 (paper: 0.1).
        lr_decay: after warm-up: ``constant``, ``linear`` to 0 (paper) or ``cosine``.
        accumulate_grad_batches: micro-batches per optimizer step (Lightning's flag is refused here).
        gradient_clip_val: max global L2 norm of the synthesized update (``None`` = no clipping).
        grad_buffer_dtype: forget buffer dtype (param: less memory).
        diagnostics_every_n_steps: geometry every N steps (None: each log; 0: off).
    """

    def __init__(
        self,
        network: ModelSetup = lazy_instance(ModelSetup),
        forget_objective: Objective = lazy_instance(GradientAscent),
        retain_objective: Objective = lazy_instance(NLL),
        synthesizer: Synthesizer = lazy_instance(WeightedSum),
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.0,
        lr_decay: Literal["constant", "linear", "cosine"] = "constant",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        grad_buffer_dtype: Literal["float32", "param"] = "float32",
        diagnostics_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        network = network if isinstance(network, ModelSetup) else ModelSetup(network)  # a path or module
        # hparams.yaml and the checkpoint hold the configuration as plain data, never pickled objects
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.save_hyperparameters({k: describe(v) for k, v in given.items()})
        self.automatic_optimization = False
        checks.module_flags(accumulate_grad_batches, warmup_ratio, lr_decay, gradient_clip_val, lr_scheduler)
        self.network, self.synthesizer = network, synthesizer
        self.forget_objective, self.retain_objective = forget_objective, retain_objective
        self.model: nn.Module | None = network.prepare(network.loaded) if network.loaded is not None else None
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.warmup_ratio, self.lr_decay = warmup_ratio, lr_decay
        self.accumulate_grad_batches, self.gradient_clip_val = accumulate_grad_batches, gradient_clip_val
        self.grad_buffer_dtype, self.diagnostics_every_n_steps = grad_buffer_dtype, diagnostics_every_n_steps
        self.grads: TwoTaskGradients | None = None
        self.reference: nn.Module | None = None  # frozen π_ref: not trained, checkpointed or DDP-wrapped
        self.state, self.last_outcome = EngineState(), cast(StepOutcome | None, None)
        self._stop_requested = False
        self._compile_reported = False
        self.layer_grid: LayerGrid | None = None  # trainable tensors by block and module type
        # Under FSDP a rule's per-parameter state (GRU's average) is this rank's shard: it is kept
        # as DTensor buffers of this child, so the distributed checkpoint saves and restores every
        # rank's shard with the parameters (the checkpoint's other entries are rank 0's alone).
        self.rule_state = nn.Module()
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: self._expose_rule_state())
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self._expose_rule_state())

    def configure_model(self) -> None:
        """Shard the model and the reference with FSDP2 under Lightning's ``ModelParallelStrategy``."""
        if self.model is not None and self._trainer is not None:
            self.network.shard(self.model, self.reference, self.trainer.strategy)

    def setup(self, stage: str) -> None:
        checks.check_supported(self.trainer)
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit":
            checks.check_alternates(self.forget_objective, dm)
        if self.model is None:  # after the data module's setup: data errors surface before the load
            self.model = self.network.load()
        self.network.check(self.model, str(self.trainer.precision), getattr(dm, "max_length", None))
        needs_ref = self.forget_objective.requires_reference or self.retain_objective.requires_reference
        if stage == "fit" and needs_ref and self.reference is None:
            # setup runs before a checkpoint is restored: this is the model at the start of unlearning
            object.__setattr__(self, "reference", self.network.reference(self.model))  # not a submodule
        for objective in (self.forget_objective, self.retain_objective):
            objective.setup(self.model)

    def on_fit_start(self) -> None:
        assert self.model is not None
        if self.reference is not None:
            self.reference.to(device=self.device, dtype=self._trainable()[0].dtype)
        dm = getattr(self.trainer, "datamodule", None)  # precomputing objectives read the forget set
        forget = dm.forget_batches(self.device) if getattr(dm, "forget_examples", None) else None
        self.forget_objective.prepare(self.model, forget)

    def on_train_start(self) -> None:
        # After every restore (FSDP restores after on_fit_start): buffers installed earlier point
        # .grad at them, and torch then silently skips restoring AdamW's moments. A forward pass
        # before this point leaves FSDP's root gathered: drop the stand-ins, keep the shards.
        assert self.model is not None
        drop_gathered_parameters(self.model)
        dtype = torch.float32 if self.grad_buffer_dtype == "float32" else None
        self.grads = TwoTaskGradients(
            self._trainable(), dtype, self.accumulate_grad_batches, self.trainer.world_size
        )
        self.synthesizer.use_reducer(self.grads.reducer)  # whole-tensor sums of sharded buffers
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        self.layer_grid = LayerGrid.from_names(names)  # same order as _trainable()

    def _trainable(self) -> list[nn.Parameter]:
        assert self.model is not None
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        default = lambda p: torch.optim.AdamW(p, lr=1e-5, weight_decay=0.0)  # noqa: E731 (the paper's)
        opt = (self.optimizer_factory or default)(self._trainable())
        for group in opt.param_groups:
            checks.check_learning_rate(group.get("lr", 1.0), "--model.optimizer: the learning rate")
        if self.scheduler_factory is not None:
            return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = math.ceil(self.trainer.estimated_stepping_batches / self.accumulate_grad_batches)
        return {"optimizer": opt, "lr_scheduler": lr_schedule(opt, total, self.warmup_ratio, self.lr_decay)}

    # ------------------------------------------------------------------ the step (Algorithm 1)
    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> dict[str, Any] | None:
        grads = self.grads
        assert grads is not None and self.model is not None
        with no_backward_sync(self.trainer.strategy):
            for task, objective in self._parts().items():
                grads.begin(task)
                total, count, extra = split_terms(
                    objective.loss_terms(self.model, batch[task], self.reference)
                )
                # summed loss / a constant: the effective-batch mean is restored at the boundary
                self.manual_backward(total / grads.backward_scale(task, batch[task]["input_ids"].shape[0]))
                grads.end(task)
                grads.record(task, total, count, extra)
        grads.micro_batch_done()
        if (batch_idx + 1) % self.accumulate_grad_batches == 0 or self.trainer.is_last_batch:
            return {"outcome": self._optimizer_step()}
        return None

    def _optimizer_step(self) -> StepOutcome:
        grads, opt = self.grads, self.optimizers()
        assert grads is not None and self.model is not None
        losses, stop = grads.reduce(self._stop_requested)
        forget_loss, retain_loss, finite, stop_agreed = StepOutcome.read(
            losses, grads.finite() & torch.isfinite(losses).all(), stop
        )
        step, state = self.global_step + 1, self.state.count(finite, retain_loss)
        outcome = self.last_outcome = StepOutcome(
            step, forget_loss, retain_loss, not finite, stop_agreed, opt.param_groups[0]["lr"], state,
            self.retain_objective.uniform_loss(self.model), grads.take_metric_sums(), grads.last_counts,
        )  # fmt: skip
        if finite:
            every = self.diagnostics_every_n_steps
            every = self.trainer.log_every_n_steps if every is None else every
            diagnose = bool(every) and step % every == 0
            geometry = GeometryAccumulator(grads.reducer, self.layer_grid) if diagnose else None
            self.synthesizer(grads.forget_views, grads.retain_views, out=grads.grad_views, observer=geometry)
            if self.synthesizer.compiled and not self._compile_reported:
                self._compile_reported = True
                if self.trainer.is_global_zero:
                    print(
                        f"lit-unlearn: synthesis kernels compiled in {self.synthesizer.compile_seconds:.1f} s "
                        "(once per process; LIT_UNLEARN_COMPILE=0 runs them eagerly)",
                        flush=True,
                    )
            if self.gradient_clip_val is not None:
                grads.clip_(self.gradient_clip_val)
            opt.step()  # the guards' on_before_optimizer_step may stop the run here
            self.lr_schedulers().step()
            if geometry is not None:
                outcome.geometry = {**geometry.result(), **self.synthesizer.last_report}
                state.last_geometry = {"step": step, **{k: float(v) for k, v in outcome.geometry.items()}}
                if geometry.layer_sums is not None and self.layer_grid is not None:
                    outcome.layer_geometry = layer_geometry(geometry.layer_sums, self.layer_grid)
        grads.zero()
        return outcome

    @property
    def at_step_boundary(self) -> bool:
        """No micro-batch is waiting in the buffers (a checkpoint taken now resumes exactly)."""
        return self.grads is None or self.grads.pending == 0

    def request_stop(self) -> None:
        """Stop after the current optimizer step (the ranks agree on it in the step's reduction)."""
        self._stop_requested = True

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self.model is not None
        names = getattr(getattr(self.trainer, "datamodule", None), "val_names", None)
        name = names[dataloader_idx] if names else str(dataloader_idx)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, count = nll_terms(logits, batch["labels"])
        # weighted by label tokens (one host sync per batch): the split's token mean on every rank
        tokens = max(int(count), 1)
        self.log(
            f"val/{name}_nll", total / tokens, batch_size=tokens, add_dataloader_idx=False, sync_dist=True
        )

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``lit-unlearn test``: the held-out losses again (lm-eval runs via ``LMEvalCallback``)."""
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        layout = checks.batch_layout(self.trainer, self.accumulate_grad_batches)
        saved = checkpoint["lit_unlearn"] = save_engine(self.state, layout, self._parts(), self.synthesizer)
        if self._expose_rule_state():  # sharded: in the state dict, not rank 0's copy in the metadata
            for key in self.synthesizer.parameter_state_keys:
                saved["synthesizer"].pop(key, None)

    def _expose_rule_state(self) -> bool:
        """Under FSDP, register the rule's per-parameter state as DTensor buffers of
        :attr:`rule_state` (sharing storage with the rule's tensors, created at their initial
        value before the first step) and return ``True``; otherwise do nothing."""
        keys = self.synthesizer.parameter_state_keys
        params = self._trainable() if keys and self.model is not None else []
        if not params or not all(isinstance(p, DTensor) for p in params):
            return False
        local = [cast(DTensor, p).to_local() for p in params]
        dtype = torch.float32 if self.grad_buffer_dtype == "float32" else local[0].dtype
        state = self.synthesizer.parameter_state([t.shape for t in local], dtype, local[0].device)
        for key, tensors in state.items():
            for j, (tensor, p) in enumerate(zip(tensors, params)):
                wrapped = DTensor.from_local(
                    tensor, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
                self.rule_state.register_buffer(f"{key}_{j:05d}", wrapped)
        return True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        now = checks.batch_layout(self.trainer, self.accumulate_grad_batches) if self._trainer else None
        restore_engine(checkpoint.get("lit_unlearn", {}), now, self.state, self._parts(), self.synthesizer)

    def _parts(self) -> dict[Task, Objective]:
        return dict(zip(TASKS, (self.forget_objective, self.retain_objective)))
