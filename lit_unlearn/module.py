"""UnlearningModule: two task gradients per step, combined by a pluggable synthesizer.

Launch it through the CLI (``lit_unlearn/cli.py``)::

    lit-unlearn fit --config configs/debug/tiny.yaml
    lit-unlearn fit --config configs/debug/tiny.yaml --model.synthesizer SAGO

Features: manual optimization (Lightning owns the loop, this module owns the step); separate
forget/retain accumulation over ``accumulate_grad_batches`` micro-batches with one synthesis per
optimizer step; losses normalised over the whole effective batch (all micro-batches and ranks:
tokens for token-mean objectives, sequences for NPO/SimNPO); DDP with no-sync backward passes and
one reduction per task buffer; precisions ``32-true``, ``bf16-mixed``, ``bf16-true``, ``16-true``;
gradient clipping of the synthesized update; NaN/inf steps skipped, counted and capped; a
collapse guard on the retain loss; a frozen reference model (or precomputed reference values)
for NPO/KL/RMU; trainable-parameter regex; exact resume (optimizer, scheduler, step, data
position, RNG); the unlearned model saved atomically with ``save_pretrained`` at the end of fit.
The model loads in ``setup`` (after the data), so bad data fails before a 7 B model is read.

Not supported: FSDP / model-parallel strategies (element-wise rules would work on shards, but the
buffer management here assumes whole parameters; selecting one fails with a clear message) and
``16-mixed`` (loss scaling would have to be undone before synthesis; use ``bf16-mixed``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lit_unlearn.adapters import AdaptersOff, LoRA, adapter_weights, is_adapted
from lit_unlearn.errors import TrainingDiverged, UserError
from lit_unlearn.gradients import Task, TwoTaskGradients, no_backward_sync
from lit_unlearn.logs import describe, log_at_step
from lit_unlearn.models import (
    DTYPES,
    check_model_path,
    compile_trainable,
    drop_gathered_parameters,
    enable_activation_checkpointing,
    frozen_copy,
    load_causal_lm,
    select_trainable,
    shard_with_fsdp2,
)
from lit_unlearn.objectives import NLL, GradientAscent, Objective
from lit_unlearn.objectives.base import split_terms
from lit_unlearn.objectives.functional import nll_terms
from lit_unlearn.schedule import lr_schedule
from lit_unlearn.synthesis import GeometryAccumulator, Synthesizer, WeightedSum

log = logging.getLogger(__name__)
DEFAULT_MODEL = "synthetic://default"
TASKS: tuple[Task, Task] = ("forget", "retain")


def check_supported(trainer: Any) -> None:
    """Refuse strategies and precisions the engine does not handle, with the flag to change."""
    strategy = type(trainer.strategy).__name__
    if any(name in strategy for name in ("FSDP", "DeepSpeed")):
        raise UserError(
            f"--trainer.strategy: {strategy} is not supported; for sharded training use ModelParallelStrategy "
            "(FSDP2, e.g. --config configs/trainer/cpu_fsdp.yaml or gpu_fsdp.yaml), otherwise ddp or one device"
        )
    if str(trainer.precision) in ("16-mixed", "16"):
        raise UserError(
            "--trainer.precision 16-mixed is not supported (loss scaling would distort synthesis); use bf16-mixed or bf16-true"
        )
    if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
        raise UserError(
            "set --trainer.use_distributed_sampler false: UnlearningDataModule shards batches by rank itself"
        )


class UnlearningModule(L.LightningModule):
    """LLM unlearning as an asymmetric two-task problem (arXiv 2604.14808).

    Args:
        model: hub id or local directory of the causal LM to unlearn, or ``synthetic://default`` /
            ``synthetic://smoke`` for the embedded benchmark's target (built once, then cached).
            Loaded in ``setup``, after the data have been read. From Python, an already loaded
            ``nn.Module`` is accepted too.
        forget_objective: the forget loss; descending it forgets.
        retain_objective: the retain loss.
        synthesizer: combines the two gradients (the paper's α is its
            ``retain_weight``, γ its ``forget_weight``).
        adapter: train low-rank adapters instead of the weights (``lit_unlearn.adapters.LoRA``,
            e.g. ``--config configs/adapter/lora.yaml``): the task buffers are adapter-sized, the
            reference model is the same network with the adapters off, and ``unlearned_model/``
            holds the adapter (plus the merged model with ``merge_on_save``). ``None`` = full
            fine-tuning.
        optimizer: optimizer factory (default: AdamW, lr 1e-5, weight decay 0, as in the paper).
        lr_scheduler: scheduler factory stepped once per optimizer step; ``None`` = the built-in
            schedule given by ``warmup_ratio`` and ``lr_decay`` (refused together with them).
        warmup_ratio: share of optimizer steps with linear warm-up from 0, ``ceil(ratio x steps)``
            steps as in the Hugging Face Trainer (paper: 0.1).
        lr_decay: shape after warm-up: ``constant``, ``linear`` to 0 at the last step (paper) or
            ``cosine`` (``transformers.get_scheduler``).
        accumulate_grad_batches: micro-batches per optimizer step (Lightning's Trainer flag is
            refused under manual optimization; this is its replacement).
        gradient_clip_val: max global L2 norm of the synthesized update (``None`` = no clipping).
        trainable_parameters: regex on parameter names; only matches are trained (RMU:
            ``layers\\.(5|6|7)\\.mlp\\.down_proj``). ``None`` = all parameters.
        activation_checkpointing: recompute each decoder layer's activations in the backward passes
            instead of keeping them (non-reentrant; less memory, ~1/3 more compute); works with
            DDP and FSDP and with both task backward passes.
        dtype: weight dtype when loading by name: ``float32``, ``bfloat16``, ``float16``, ``auto``.
        attn_implementation: attention kernel (``sdpa``, ``eager``, ``flash_attention_2``).
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        revision: hub revision of ``model`` (a commit hash pins the exact weights, tokenizer and
            generation config; the CLI passes it on to the tokenizer). ``None`` = the default branch.
        grad_buffer_dtype: dtype of the forget-gradient buffer: ``float32`` or ``param`` (the
            gradients' own dtype; saves memory under ``bf16-true``).
        max_consecutive_bad_steps: stop with an error after this many consecutive optimizer steps
            whose losses or gradients were NaN/inf (each is skipped and counted).
        collapse_threshold: stop with an error (exit code 3, no model saved, ``last.ckpt`` kept)
            when the retain loss of an optimizer step exceeds this fraction of the loss of a
            uniform prediction, ``ln(vocabulary size)`` (but at least twice its first-step value,
            since an untrained model starts near uniform): the model has collapsed, e.g. under a
            far too high learning rate. 0.8 is ~8.3 nats for a 32 k vocabulary (perplexity
            ~4,000), far above any usable model. ``None`` = off. Applies to retain losses that
            define a uniform loss (``NLL``); KL and EmbedDiff start at 0 and are not checked.
        collapse_patience: how many consecutive optimizer steps the retain loss must stay above
            that bound before the run stops (one hard batch of long, unfamiliar answers can spike
            the loss for a step; a collapsed model stays there).
        diagnostics_every_n_steps: log the synthesis geometry every N optimizer steps
            (``None`` = the Trainer's ``log_every_n_steps``; 0 = never). Training metrics are
            logged every ``log_every_n_steps`` *optimizer* steps, indexed by completed steps.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        forget_objective: Objective = lazy_instance(GradientAscent),
        retain_objective: Objective = lazy_instance(NLL),
        synthesizer: Synthesizer = lazy_instance(WeightedSum),
        adapter: LoRA | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.0,
        lr_decay: Literal["constant", "linear", "cosine"] = "constant",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        trainable_parameters: str | None = None,
        activation_checkpointing: bool = False,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        grad_buffer_dtype: Literal["float32", "param"] = "float32",
        max_consecutive_bad_steps: int = 5,
        collapse_threshold: float | None = 0.8,
        collapse_patience: int = 3,
        diagnostics_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        # hparams.yaml and the checkpoint record the configuration as plain data (class paths and
        # arguments; a loaded model by its class name), never pickled objects.
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.save_hyperparameters(
            {
                k: describe(type(v).__name__ if k == "model" and not isinstance(v, str) else v)
                for k, v in given.items()
            }
        )
        self.automatic_optimization = False
        if accumulate_grad_batches < 1:
            raise UserError(f"--model.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise UserError(f"--model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise UserError(f"--model.gradient_clip_val must be > 0, got {gradient_clip_val}")
        if lr_scheduler is not None and (warmup_ratio != 0.0 or lr_decay != "constant"):
            raise UserError(
                "--model.warmup_ratio / --model.lr_decay shape the built-in schedule and would be ignored next to "
                "--model.lr_scheduler; set one or the other"
            )
        if collapse_patience < 1:
            raise UserError(f"--model.collapse_patience must be >= 1, got {collapse_patience}")
        if collapse_threshold is not None and not collapse_threshold > 0:
            raise UserError(
                f"--model.collapse_threshold must be > 0 (or null to switch the guard off), got {collapse_threshold}"
            )
        self._trainable_pattern = compile_trainable(trainable_parameters)
        if dtype not in DTYPES:
            raise UserError(f"--model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if isinstance(model, str):
            # a mistyped local path fails now, not after the data and a hub retry loop
            check_model_path(model)
        self.model_source = model if isinstance(model, str) else type(model).__name__
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.load_args = (dtype, attn_implementation, trust_remote_code, revision)
        self.forget_objective = forget_objective
        self.retain_objective = retain_objective
        self.synthesizer = synthesizer
        self.adapter = adapter
        self._adapter_before: list[Tensor] | None = None  # for the no-change guard
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.warmup_ratio, self.lr_decay = warmup_ratio, lr_decay
        self.accumulate_grad_batches, self.gradient_clip_val = accumulate_grad_batches, gradient_clip_val
        self.grad_buffer_dtype = grad_buffer_dtype
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.collapse_threshold, self.collapse_patience = collapse_threshold, collapse_patience
        self.collapsed_steps = 0  # consecutive optimizer steps above the collapse bound
        self.diagnostics_every_n_steps = diagnostics_every_n_steps
        self.trainable_parameters = trainable_parameters
        self.activation_checkpointing = activation_checkpointing
        self.grads: TwoTaskGradients | None = None
        self.reference: nn.Module | None = None  # frozen π_ref; kept out of state_dict (see __setattr__)
        self.bad_steps, self.consecutive_bad_steps = 0, 0
        self.retain_baseline: float | None = None  # first-step retain loss (collapse guard)
        self._baseline: Tensor | None = None
        self.stop_requested = False  # set by the interrupt handler; agreed across ranks at the boundary
        self.stop_agreed = False
        self.last_geometry: dict[str, float] | None = None
        self._extra: dict[str, Any] = {}  # objective metrics of the current optimizer step (sums)
        self._model_ready = False
        if self.model is not None:
            self._prepare_model()

    def __setattr__(self, name: str, value: Any) -> None:
        # the reference is never a registered submodule: not trained, not checkpointed, not DDP-wrapped
        if name == "reference":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ set-up
    def _prepare_model(self) -> None:
        assert self.model is not None
        if self.adapter is not None and not is_adapted(self.model):
            self.model = self.adapter.apply(self.model)
        select_trainable(self.model, self._trainable_pattern, "--model.trainable_parameters")
        if self.activation_checkpointing:
            enable_activation_checkpointing(self.model)
            if is_adapted(self.model):
                # frozen embeddings: make the first layer's input require grad, so checkpointed
                # layers pass gradients to their adapters with any checkpoint implementation
                self.model.enable_input_require_grads()
        self._model_ready = True

    def configure_model(self) -> None:
        """Shard the model (and the frozen reference) with FSDP2 when the strategy is Lightning's
        ``ModelParallelStrategy``: every decoder layer, then the root, over the data-parallel mesh.
        Any other strategy: nothing to do."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(self._trainer.strategy if self._trainer else None, ModelParallelStrategy):
            return
        if self.model is None or getattr(self.model, "_lit_unlearn_sharded", False):
            return
        mesh = self.device_mesh
        assert mesh is not None  # set by the strategy before configure_model
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise UserError(
                "--trainer.strategy: ModelParallelStrategy with tensor_parallel_size > 1 is not supported; "
                "lit-unlearn shards with FSDP2 only (set tensor_parallel_size: 1)"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        shard_with_fsdp2(self.model, dp_mesh)
        if self.reference is not None and not isinstance(self.reference, AdaptersOff):
            shard_with_fsdp2(self.reference, dp_mesh)  # adapters off = the model itself: sharded above
        object.__setattr__(self.model, "_lit_unlearn_sharded", True)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        check_supported(trainer)
        if self.adapter is not None and str(trainer.precision) in ("bf16-true", "16-true"):
            rank_zero_warn(
                f"--trainer.precision {trainer.precision} casts the LoRA adapters to half precision too; for "
                "float32 adapters on a bf16 base (peft's default) use --model.dtype bfloat16 --trainer.precision 32-true"
            )
        if self.model is None:  # after the data module's setup: data errors surface before the load
            assert isinstance(self.model_source, str)
            self.model = load_causal_lm(self.model_source, *self.load_args)
        if not self._model_ready:
            self._prepare_model()
        dm = getattr(trainer, "datamodule", None)
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if dm is not None and context is not None and getattr(dm, "max_length", 0) > context:
            raise UserError(
                f"--data.max_length={dm.max_length} exceeds the model's context ({context} positions)"
            )
        needs_ref = self.forget_objective.requires_reference or self.retain_objective.requires_reference
        if stage == "fit" and needs_ref and self.reference is None:
            # Copy now: setup runs before a checkpoint's weights are restored, so this is π_ref
            # (the model at the start of unlearning) even when resuming. With adapters the base
            # weights never change: the reference is the same network with its adapters off.
            self.reference = AdaptersOff(self.model) if is_adapted(self.model) else frozen_copy(self.model)
        for objective in (self.forget_objective, self.retain_objective):
            objective.setup(self.model)

    def _trainable(self) -> list[nn.Parameter]:
        assert self.model is not None
        return [p for p in self.model.parameters() if p.requires_grad]

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(device=self.device, dtype=self._trainable()[0].dtype)
        assert self.model is not None
        self.forget_objective.prepare(self.model, self._forget_batches())

    def on_train_start(self) -> None:
        # Everything derived from restored state happens here, after every checkpoint restore:
        # under FSDP (ModelParallelStrategy) the checkpoint is loaded after on_fit_start. There,
        # torch only restores optimizer state into an optimizer whose state it can initialise,
        # which it does not do once .grad is set: installing the task buffers (which point .grad
        # at them) in on_fit_start silently dropped AdamW's moments on resume, and the collapse
        # guard's baseline was taken from the first resumed step instead of the checkpoint.
        if self.retain_baseline is not None:
            self._baseline = torch.tensor(self.retain_baseline, device=self.device)
        # A forward pass before this point (an evaluation, the sanity check) leaves FSDP's root
        # unit gathered, and a gathered unit exposes full-size stand-ins instead of its sharded
        # parameters: the buffers must hold the parameters the optimizer steps.
        assert self.model is not None
        drop_gathered_parameters(self.model)
        buffer_dtype = torch.float32 if self.grad_buffer_dtype == "float32" else None
        self.grads = TwoTaskGradients(
            self._trainable(), buffer_dtype, self.accumulate_grad_batches, self.trainer.world_size
        )
        # Dot products and norms of sharded buffers are summed over ranks: whole-tensor values.
        self.synthesizer.use_reducer(self.grads.reducer)
        if is_adapted(self.model):
            self._adapter_before = adapter_weights(self.model)  # the restored adapters, when resuming
        batches, k = self.trainer.num_training_batches, self.accumulate_grad_batches
        if k > 1 and math.isfinite(batches) and batches % k:
            log.warning(
                "an epoch has %d batches, not a multiple of accumulate_grad_batches=%d: the last optimizer "
                "step of each epoch averages over fewer micro-batches",
                batches,
                k,
            )

    def _forget_batches(self) -> Iterator[dict[str, Tensor]] | None:
        """The data module's forget set in dataset order (lazy: only precomputing objectives read it)."""
        dm = getattr(self.trainer, "datamodule", None)
        return (
            dm.forget_batches(self.device)
            if dm is not None and getattr(dm, "forget_examples", None)
            else None
        )

    def configure_optimizers(self) -> Any:
        params = self._trainable()
        opt = (
            self.optimizer_factory(params)
            if self.optimizer_factory
            else torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        )
        for group in opt.param_groups:
            if not group.get("lr", 1.0) > 0:
                raise UserError(f"--model.optimizer: the learning rate must be > 0, got {group['lr']}")
        if self.scheduler_factory is not None:
            return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = math.ceil(self.trainer.estimated_stepping_batches / self.accumulate_grad_batches)
        schedule = lr_schedule(opt, total, self.warmup_ratio, self.lr_decay)
        return {"optimizer": opt, "lr_scheduler": schedule}

    # ------------------------------------------------------------------ the step (Algorithm 1)
    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> None:
        grads = self.grads
        assert grads is not None and self.model is not None
        with no_backward_sync(self.trainer.strategy):
            for task, objective in zip(TASKS, (self.forget_objective, self.retain_objective)):
                grads.begin(task)
                total, count, extra = split_terms(
                    objective.loss_terms(self.model, batch[task], self.reference)
                )
                for name, value in extra.items():  # objective metrics: summed like the loss, device-side
                    key = f"{task}_{name}"
                    self._extra[key] = self._extra.get(key, 0.0) + value.detach().double()
                # Summed loss / a constant: the exact effective-batch mean is restored at the boundary.
                self.manual_backward(total / grads.backward_scale(task, batch[task]["input_ids"].shape[0]))
                grads.end(task)
                grads.record(task, total, count)
        grads.micro_batch_done()
        if (batch_idx + 1) % self.accumulate_grad_batches == 0 or self.trainer.is_last_batch:
            self._optimizer_step()

    @property
    def at_step_boundary(self) -> bool:
        """No micro-batch is waiting in the buffers (a checkpoint taken now resumes exactly)."""
        return self.grads is None or self.grads.pending == 0

    def _optimizer_step(self) -> None:
        grads, opt = self.grads, self.optimizers()
        assert grads is not None
        losses, stop = grads.reduce(self.stop_requested)
        finite = grads.finite() & torch.isfinite(losses).all()
        diverged = self._diverged(losses[1])
        # The one host sync per optimizer step: finiteness, collapse and agreed stop together.
        ok, blown, stop_votes = torch.stack([finite.double(), diverged.double(), stop.double()]).tolist()
        self.stop_agreed = stop_votes > 0
        if not ok:
            return self._skip_step(losses)
        self._check_collapse(bool(blown), losses[1])
        self.consecutive_bad_steps = 0
        if self._baseline is None:
            self._baseline = losses[1].detach().clone()
        # Metrics are indexed by completed optimizer steps (as evaluations are), whatever the
        # accumulation, so train and val curves share one x-axis.
        done = self.global_step + 1
        log_every = self.trainer.log_every_n_steps
        diag_every = (
            self.diagnostics_every_n_steps if self.diagnostics_every_n_steps is not None else log_every
        )
        geometry = GeometryAccumulator(grads.reducer) if diag_every and done % diag_every == 0 else None
        self.synthesizer(grads.forget_views, grads.retain_views, out=grads.grad_views, observer=geometry)
        if self.gradient_clip_val is not None:
            grads.clip_(self.gradient_clip_val)
        stepped_lr = opt.param_groups[0]["lr"]
        opt.step()
        self.lr_schedulers().step()
        grads.zero()
        if self._adapter_before is not None and stepped_lr > 0:  # warm-up starts at lr 0
            self._check_adapters_moved()
        self.log_dict(
            {"train/forget_loss": losses[0], "train/retain_loss": losses[1]}, prog_bar=True, logger=False
        )
        metrics: dict[str, Any] = {}
        if log_every and done % log_every == 0:
            metrics.update(
                {"forget_loss": losses[0], "retain_loss": losses[1], "lr": opt.param_groups[0]["lr"]}
            )
            metrics.update(self._objective_metrics())
        self._extra = {}
        if geometry is not None:
            stats = {**geometry.result(), **self.synthesizer.last_report}
            metrics.update(stats)
            self.last_geometry = {"step": done, **{k: float(v) for k, v in stats.items()}}
        if metrics:
            log_at_step(self.trainer, {f"train/{k}": v for k, v in metrics.items()}, done)

    def _check_adapters_moved(self) -> None:
        """After the first optimizer step with a learning rate > 0, at least one adapter weight
        must have changed (a LoRA run whose gradients never reach the adapters would otherwise
        train nothing, silently)."""
        assert self._adapter_before is not None and self.model is not None
        now = [p.detach() for p in self.model.parameters() if p.requires_grad]
        moved = torch.stack([(a != b).any() for a, b in zip(self._adapter_before, now)]).any()
        self._adapter_before = None  # checked once: one host sync in the whole run
        if not bool(moved):
            raise TrainingDiverged(
                "no adapter weight changed in the first optimizer step: the gradients do not reach the "
                "adapters (check --model.adapter.target_modules, a learning rate > 0, and that nothing detaches "
                "the inputs of checkpointed layers); no model was saved"
            )

    def _objective_metrics(self) -> dict[str, Tensor]:
        """Effective-batch means of what the objectives reported (one small all-reduce, on
        logging steps only; every rank logs on the same steps)."""
        if not self._extra:
            return {}
        assert self.grads is not None
        names = sorted(self._extra)
        sums = torch.stack([torch.as_tensor(self._extra[n], device=self.device) for n in names])
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        counts = self.grads.last_counts
        return {n: sums[i] / counts[0 if n.startswith("forget_") else 1] for i, n in enumerate(names)}

    def _check_collapse(self, above: bool, retain_loss: Tensor) -> None:
        """Count consecutive steps above the collapse bound; stop after ``collapse_patience``."""
        self.collapsed_steps = self.collapsed_steps + 1 if above else 0
        if self.collapsed_steps < self.collapse_patience:
            return
        if self.grads is not None:
            self.grads.zero()
        assert self.model is not None
        uniform = self.retain_objective.uniform_loss(self.model)
        raise TrainingDiverged(
            f"the retain loss stayed above --model.collapse_threshold={self.collapse_threshold} x the loss of a "
            f"uniform prediction (ln V = {uniform:.4g}) for {self.collapsed_steps} optimizer steps (last: "
            f"{float(retain_loss):.4g} at step {self.global_step + 1}): the model has collapsed (lower the learning "
            "rate); no unlearned model was saved"
        )

    def _diverged(self, retain_loss: Tensor) -> Tensor:
        """Device bool: the retain loss passed ``collapse_threshold`` × ln V (and twice its start)."""
        assert self.model is not None
        uniform = self.retain_objective.uniform_loss(self.model)
        if self.collapse_threshold is None or uniform is None:
            return torch.zeros((), dtype=torch.bool, device=retain_loss.device)
        if self._baseline is None:  # set by the first finite step
            return torch.zeros((), dtype=torch.bool, device=retain_loss.device)
        return retain_loss > torch.clamp(2 * self._baseline, min=self.collapse_threshold * uniform)

    def _skip_step(self, losses: Tensor) -> None:
        assert self.grads is not None
        self.grads.zero()
        self._extra = {}
        self.bad_steps += 1
        self.consecutive_bad_steps += 1
        log_at_step(self.trainer, {"train/skipped_steps": self.bad_steps}, self.global_step)
        log.warning(
            "skipped optimizer step: non-finite loss or gradient (forget_loss=%s, retain_loss=%s)",
            *losses.tolist(),
        )
        if self.consecutive_bad_steps >= self.max_consecutive_bad_steps:
            raise TrainingDiverged(
                f"{self.consecutive_bad_steps} consecutive optimizer steps had NaN/inf losses or gradients "
                f"(last forget_loss={losses[0].item()}, retain_loss={losses[1].item()}); lower the learning rate, "
                "check the data, or raise --model.max_consecutive_bad_steps"
            )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self.model is not None
        dm = getattr(self.trainer, "datamodule", None)
        name = (
            dm.val_names[dataloader_idx]
            if dm is not None and hasattr(dm, "val_names")
            else str(dataloader_idx)
        )
        total, count = nll_terms(
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
        # Weighted by label tokens (one host sync per validation batch), so the epoch value is the
        # token mean of the whole split on every rank, not a mean of per-batch means.
        tokens = max(int(count), 1)
        self.log(
            f"val/{name}_nll", total / tokens, batch_size=tokens, add_dataloader_idx=False, sync_dist=True
        )

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``lit-unlearn test``: the held-out losses again (lm-eval runs via ``LMEvalCallback``)."""
        self.validation_step(batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------ checkpoint and export
    def _global_batch(self) -> dict[str, int]:
        dm = getattr(self.trainer, "datamodule", None)
        k, world = self.accumulate_grad_batches, self.trainer.world_size
        return {
            "world_size": world,
            "accumulate_grad_batches": k,
            **{f"{t}_per_device": int(getattr(dm, f"{t}_batch_size", 0) or 0) for t in TASKS},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._baseline is not None and self.retain_baseline is None:
            self.retain_baseline = float(self._baseline)
        checkpoint["lit_unlearn"] = {
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "bad_steps": self.bad_steps,
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "retain_baseline": self.retain_baseline,
            "collapsed_steps": self.collapsed_steps,
            "batch_layout": self._global_batch(),
            "objectives": {
                t: o.state_dict() for t, o in zip(TASKS, (self.forget_objective, self.retain_objective))
            },
            # a stateful rule (e.g. running statistics of the gradient geometry) opts in with state_dict()
            "synthesizer": self.synthesizer.state_dict() if hasattr(self.synthesizer, "state_dict") else {},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_unlearn", {})
        saved = state.get("batch_layout")
        if saved is not None and self._trainer is not None:
            now = self._global_batch()
            if saved != now:

                def describe(d: dict[str, int]) -> str:
                    return (
                        f"{d['forget_per_device']}+{d['retain_per_device']} sequences per device x {d['world_size']} "
                        f"process(es) x {d['accumulate_grad_batches']} micro-batch(es)"
                    )

                raise UserError(
                    f"--ckpt_path: the checkpoint was trained with {describe(saved)}, this run uses {describe(now)}; "
                    "resume with the same --data.*_batch_size, --trainer.devices/num_nodes and --model.accumulate_grad_batches "
                    "(a different layout would change the data order and the optimizer steps)"
                )
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.bad_steps = state.get("bad_steps", 0)
        self.consecutive_bad_steps = state.get("consecutive_bad_steps", 0)
        self.retain_baseline = state.get("retain_baseline")
        self.collapsed_steps = state.get("collapsed_steps", 0)
        for task, objective in zip(TASKS, (self.forget_objective, self.retain_objective)):
            objective.load_state_dict(state.get("objectives", {}).get(task, {}))
        if state.get("synthesizer") and hasattr(self.synthesizer, "load_state_dict"):
            self.synthesizer.load_state_dict(state["synthesizer"])
