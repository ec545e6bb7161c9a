"""UnlearningModule: two task gradients per step, combined by a pluggable synthesizer.

Launch it through the CLI (``lit_unlearn/cli.py``)::

    lit-unlearn fit --config configs/debug/tiny.yaml
    lit-unlearn fit --config configs/debug/tiny.yaml --model.synthesizer SAGO

Features: manual optimization (Lightning owns the loop, this module owns the step); separate
forget/retain accumulation over ``accumulate_grad_batches`` micro-batches with one synthesis per
optimizer step; DDP with no-sync backward passes and one all-reduce per task buffer; precisions
``32-true``, ``bf16-mixed``, ``bf16-true``, ``16-true``; gradient clipping of the synthesized
update; NaN/inf steps skipped, counted and capped; a frozen reference model (or precomputed
reference values) for NPO/KL/RMU; trainable-parameter regex; exact resume (optimizer, scheduler,
step, data position, RNG); the unlearned model saved with ``save_pretrained`` at the end of fit.

Not supported: FSDP / model-parallel strategies (element-wise rules would work on shards, but the
buffer management here assumes whole parameters; selecting one fails with a clear message) and
``16-mixed`` (loss scaling would have to be undone before synthesis; use ``bf16-mixed``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_unlearn.gradients import Task, TwoTaskGradients
from lit_unlearn.models import frozen_copy, load_causal_lm
from lit_unlearn.objectives import NLL, GradientAscent, Objective
from lit_unlearn.objectives.functional import mean_nll
from lit_unlearn.synthesis import GeometryAccumulator, Synthesizer, WeightedSum

log = logging.getLogger(__name__)
DEFAULT_MODEL = "synthetic://default"
TASKS: tuple[Task, Task] = ("forget", "retain")


def check_supported(trainer: Any) -> None:
    """Refuse strategies and precisions the engine does not handle, with the flag to change."""
    strategy = type(trainer.strategy).__name__
    if any(name in strategy for name in ("FSDP", "ModelParallel", "DeepSpeed")):
        raise ValueError(f"--trainer.strategy: {strategy} is not supported yet; use ddp or one device (README, Limitations)")
    if str(trainer.precision) in ("16-mixed", "16"):
        raise ValueError("--trainer.precision 16-mixed is not supported (loss scaling would distort synthesis); use bf16-mixed or bf16-true")
    if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
        raise ValueError("set --trainer.use_distributed_sampler false: UnlearningDataModule shards batches by rank itself")


class UnlearningModule(L.LightningModule):
    """LLM unlearning as an asymmetric two-task problem (arXiv 2604.14808).

    Args:
        model: hub id or local directory of the causal LM to unlearn, ``synthetic://default`` /
            ``synthetic://smoke`` for the embedded benchmark's target (built once, then cached), or
            an ``nn.Module`` (for tests).
        forget_objective: the forget loss; descending it forgets.
        retain_objective: the retain loss.
        synthesizer: combines the two gradients (the paper's α is its
            ``retain_weight``, γ its ``forget_weight``).
        optimizer: optimizer factory (default: AdamW, lr 1e-5, weight decay 0, as in the paper).
        lr_scheduler: scheduler factory stepped once per optimizer step; ``None`` = the built-in
            schedule given by ``warmup_ratio`` and ``lr_decay``.
        warmup_ratio: share of optimizer steps with linear warm-up (paper: 0.1).
        lr_decay: shape after warm-up: ``constant``, ``linear`` (paper) or ``cosine``.
        accumulate_grad_batches: micro-batches per optimizer step (Lightning's Trainer flag is
            refused under manual optimization; this is its replacement).
        gradient_clip_val: max global L2 norm of the synthesized update (``None`` = no clipping).
        trainable_parameters: regex on parameter names; only matches are trained (RMU:
            ``layers\\.(5|6|7)\\.mlp\\.down_proj``). ``None`` = all parameters.
        dtype: weight dtype when loading by name: ``float32``, ``bfloat16``, ``float16``, ``auto``.
        attn_implementation: attention kernel (``sdpa``, ``eager``, ``flash_attention_2``).
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        grad_buffer_dtype: dtype of the forget-gradient buffer: ``float32`` or ``param`` (the
            gradients' own dtype; saves memory under ``bf16-true``).
        max_consecutive_bad_steps: stop with an error after this many consecutive optimizer steps
            whose losses or gradients were NaN/inf (each is skipped and counted).
        diagnostics_every_n_steps: log the synthesis geometry every N optimizer steps
            (``None`` = the Trainer's ``log_every_n_steps``; 0 = never). Training metrics are
            logged every ``log_every_n_steps`` *optimizer* steps, indexed by completed steps.
        save_model: save the unlearned model and tokenizer (``save_pretrained``) at the end of fit.
    """

    def __init__(
        self,
        model: str | nn.Module = DEFAULT_MODEL,
        forget_objective: Objective = lazy_instance(GradientAscent),
        retain_objective: Objective = lazy_instance(NLL),
        synthesizer: Synthesizer = lazy_instance(WeightedSum),
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_ratio: float = 0.0,
        lr_decay: Literal["constant", "linear", "cosine"] = "constant",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        trainable_parameters: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        grad_buffer_dtype: Literal["float32", "param"] = "float32",
        max_consecutive_bad_steps: int = 5,
        diagnostics_every_n_steps: int | None = None,
        save_model: bool = True,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if accumulate_grad_batches < 1:
            raise ValueError(f"--model.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"--model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"--model.gradient_clip_val must be > 0, got {gradient_clip_val}")
        self.model_source = model if isinstance(model, str) else type(model).__name__
        self.model = model if isinstance(model, nn.Module) else load_causal_lm(model, dtype, attn_implementation, trust_remote_code)
        self.forget_objective = forget_objective
        self.retain_objective = retain_objective
        self.synthesizer = synthesizer
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.warmup_ratio, self.lr_decay = warmup_ratio, lr_decay
        self.accumulate_grad_batches, self.gradient_clip_val = accumulate_grad_batches, gradient_clip_val
        self.grad_buffer_dtype = grad_buffer_dtype
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.diagnostics_every_n_steps, self.save_model = diagnostics_every_n_steps, save_model
        self.trainable_parameters = trainable_parameters
        if trainable_parameters is not None:
            pattern = re.compile(trainable_parameters)
            for name, p in self.model.named_parameters():
                p.requires_grad_(bool(pattern.search(name)))
            if not any(p.requires_grad for p in self.model.parameters()):
                raise ValueError(f"--model.trainable_parameters {trainable_parameters!r} matches no parameter")
        self.grads: TwoTaskGradients | None = None
        self.reference: nn.Module | None = None  # frozen π_ref; kept out of state_dict (see __setattr__)
        self.bad_steps, self.consecutive_bad_steps = 0, 0
        self.saved_model_dir: str | None = None
        self.last_geometry: dict[str, float] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "reference":  # never a registered submodule: not trained, not checkpointed, not DDP-wrapped
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        check_supported(trainer)
        dm = getattr(trainer, "datamodule", None)
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if dm is not None and context is not None and getattr(dm, "max_length", 0) > context:
            raise ValueError(f"--data.max_length={dm.max_length} exceeds the model's context ({context} positions)")
        needs_ref = self.forget_objective.requires_reference or self.retain_objective.requires_reference
        if stage == "fit" and needs_ref and self.reference is None:
            # Copy now: setup runs before a checkpoint's weights are restored, so this is π_ref
            # (the model at the start of unlearning) even when resuming.
            self.reference = frozen_copy(self.model)
        for objective in (self.forget_objective, self.retain_objective):
            objective.setup(self.model)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def on_fit_start(self) -> None:
        params = self._trainable()
        if self.reference is not None:
            self.reference.to(device=self.device, dtype=params[0].dtype)
        buffer_dtype = torch.float32 if self.grad_buffer_dtype == "float32" else None
        self.grads = TwoTaskGradients(params, buffer_dtype, self.accumulate_grad_batches)
        self.forget_objective.prepare(self.model, self._forget_batches())
        self._loss_acc = torch.zeros(2, device=self.device)

    def on_train_start(self) -> None:
        batches, k = self.trainer.num_training_batches, self.accumulate_grad_batches
        if k > 1 and math.isfinite(batches) and batches % k:
            log.warning("an epoch has %d batches, not a multiple of accumulate_grad_batches=%d: the last optimizer "
                        "step of each epoch sees fewer micro-batches (still scaled by 1/%d)", batches, k, k)

    def _forget_batches(self) -> Iterator[dict[str, Tensor]] | None:
        """The forget set in dataset order, one device batch at a time (lazy: only NPO's
        precomputation reads it)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not getattr(dm, "forget_examples", None):
            return None
        from lit_unlearn.data.collate import pad_examples

        ex, size, pad = dm.forget_examples, dm.eval_batch_size, dm.tokenizer.pad_token_id
        return ({k: v.to(self.device) for k, v in pad_examples(ex[i : i + size], pad).items()} for i in range(0, len(ex), size))

    def configure_optimizers(self) -> Any:
        params = self._trainable()
        opt = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        if self.scheduler_factory is not None:
            return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = math.ceil(self.trainer.estimated_stepping_batches / self.accumulate_grad_batches)
        warmup, decay = int(self.warmup_ratio * total), self.lr_decay

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[decay]

        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}

    # ------------------------------------------------------------------ the step (Algorithm 1)
    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> None:
        assert self.grads is not None
        k = self.accumulate_grad_batches
        strategy = self.trainer.strategy
        # No gradient all-reduce inside backward: both task buffers are reduced once at the boundary.
        no_sync = strategy.block_backward_sync() if hasattr(strategy, "block_backward_sync") else contextlib.nullcontext()
        with no_sync:
            for i, (task, objective) in enumerate(zip(TASKS, (self.forget_objective, self.retain_objective))):
                self.grads.begin(task)
                loss = objective.loss(self.model, batch[task], self.reference)
                self.manual_backward(loss / k)
                self.grads.end(task)
                self._loss_acc[i] += loss.detach().float() / k
        if (batch_idx + 1) % k == 0 or self.trainer.is_last_batch:
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        grads, opt = self.grads, self.optimizers()
        assert grads is not None
        grads.all_reduce(self.trainer.world_size)
        losses = self.trainer.strategy.reduce(self._loss_acc, reduce_op="mean")
        self._loss_acc = torch.zeros_like(self._loss_acc)
        if not bool(grads.finite() & torch.isfinite(losses).all()):  # the one host sync per optimizer step
            return self._skip_step(losses)
        self.consecutive_bad_steps = 0
        # Metrics are indexed by completed optimizer steps (as evaluations are), whatever the
        # accumulation, so train and val curves share one x-axis.
        done = self.global_step + 1
        log_every = self.trainer.log_every_n_steps
        diag_every = self.diagnostics_every_n_steps if self.diagnostics_every_n_steps is not None else log_every
        geometry = GeometryAccumulator() if diag_every and done % diag_every == 0 else None
        self.synthesizer(grads.forget_views, grads.retain_views, out=grads.grad_views, observer=geometry)
        if self.gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(grads.params, self.gradient_clip_val, foreach=True)
        opt.step()
        self.lr_schedulers().step()
        grads.zero()
        self.log_dict({"train/forget_loss": losses[0], "train/retain_loss": losses[1]}, prog_bar=True, logger=False)
        metrics: dict[str, Any] = {}
        if log_every and done % log_every == 0:
            metrics.update({"forget_loss": losses[0], "retain_loss": losses[1], "lr": opt.param_groups[0]["lr"]})
        if geometry is not None:
            stats = {**geometry.result(), **self.synthesizer.last_report}
            metrics.update(stats)
            self.last_geometry = {"step": done, **{k: float(v) for k, v in stats.items()}}
        if metrics:
            self._write_metrics({f"train/{k}": v for k, v in metrics.items()}, done)

    def _write_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Send metrics to every logger at ``step`` (a host sync, only on logging steps) and keep
        them in ``trainer.callback_metrics`` for callbacks and monitors."""
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(values, step=step)
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})

    def _skip_step(self, losses: Tensor) -> None:
        assert self.grads is not None
        self.grads.zero()
        self.bad_steps += 1
        self.consecutive_bad_steps += 1
        self._write_metrics({"train/skipped_steps": self.bad_steps}, self.global_step)
        log.warning("skipped optimizer step: non-finite loss or gradient (forget_loss=%s, retain_loss=%s)", *losses.tolist())
        if self.consecutive_bad_steps >= self.max_consecutive_bad_steps:
            raise RuntimeError(
                f"{self.consecutive_bad_steps} consecutive optimizer steps had NaN/inf losses or gradients "
                f"(last forget_loss={losses[0].item()}, retain_loss={losses[1].item()}); lower the learning rate, "
                "check the data, or raise --model.max_consecutive_bad_steps"
            )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        name = dm.val_names[dataloader_idx] if dm is not None and hasattr(dm, "val_names") else str(dataloader_idx)
        nll = mean_nll(self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        self.log(f"val/{name}_nll", nll, add_dataloader_idx=False, sync_dist=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``lit-unlearn test``: the held-out losses again (lm-eval runs via ``LMEvalCallback``)."""
        self.validation_step(batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------ checkpoint and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_unlearn"] = {
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "bad_steps": self.bad_steps,
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "objectives": {t: o.state_dict() for t, o in zip(TASKS, (self.forget_objective, self.retain_objective))},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lit_unlearn", {})
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.bad_steps = state.get("bad_steps", 0)
        self.consecutive_bad_steps = state.get("consecutive_bad_steps", 0)
        for task, objective in zip(TASKS, (self.forget_objective, self.retain_objective)):
            objective.load_state_dict(state.get("objectives", {}).get(task, {}))

    def on_fit_end(self) -> None:
        if not self.save_model or not self.trainer.is_global_zero or not hasattr(self.model, "save_pretrained"):
            return
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir
        out = os.path.join(run_dir, "unlearned_model")
        self.model.save_pretrained(out)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            dm.tokenizer.save_pretrained(out)
        self.saved_model_dir = out
        print(f"lit-unlearn: unlearned model saved to {out}")

