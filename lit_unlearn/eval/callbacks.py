"""In-training evaluation and the matched-forgetting stop.

Fair comparisons of unlearning methods are made *at matched forgetting* (docs/benchmark.md): evaluate
every few steps and stop (or select) when a forget metric reaches a target. Under DDP the metrics
are computed data-parallel (each rank its share of the documents) or on rank 0, and broadcast to
every rank, so all ranks agree on when to stop.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import lightning as L

from lit_unlearn.engine.outcome import model_of
from lit_unlearn.eval.metrics import MetricSet
from lit_unlearn.logs import log_at_step
from lit_unlearn.models import gathered_state_dict, is_sharded
from lit_unlearn.partition import trainer_partition
from lit_unlearn.rundir import run_directory, save_pretrained_atomic

log = logging.getLogger(__name__)


class UnlearningEvaluator(L.Callback):
    """Evaluates metric sets every ``every_n_steps`` optimizer steps and logs ``val/<key>``.

    Args:
        metrics: metric sets (``SyntheticProbes``, ``CorpusNLL``, ``MultipleChoice``, ``RWKU``).
        every_n_steps: evaluation period in optimizer steps.
        at_start: also evaluate before the first step (the starting point of the trade-off curve).
        monitor: metric key for the matched-forgetting target, e.g. ``forget_qa`` (``None`` = off).
        target: the target value (e.g. 0.2 forget Q/A accuracy; 0.30 WMDP accuracy).
        mode: ``below`` = matched when ``monitor <= target``; ``above`` = when ``>=``.
        stop_on_target: stop training at the first matched evaluation (else keep training and
            only record it); the Trainer's ``max_steps`` is the step cap either way.
        save_matched_model: save the model at the first matched evaluation to
            ``<run dir>/matched_model`` (useful with ``stop_on_target: false``).
        max_length: token budget for metric sets that tokenize corpora (default: the data module's).
    """

    def __init__(
        self,
        metrics: list[MetricSet],
        every_n_steps: int = 10,
        at_start: bool = True,
        monitor: str | None = None,
        target: float | None = None,
        mode: Literal["below", "above"] = "below",
        stop_on_target: bool = True,
        save_matched_model: bool = False,
        max_length: int | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if (monitor is None) != (target is None):
            raise ValueError("set both monitor and target for the matched-forgetting stop, or neither")
        self.metrics, self.every_n_steps, self.at_start = metrics, every_n_steps, at_start
        self.monitor, self.target, self.mode = monitor, target, mode
        self.stop_on_target, self.save_matched_model, self.max_length = (
            stop_on_target,
            save_matched_model,
            max_length,
        )
        self.history: list[dict[str, float]] = []
        self.matched_step: int | None = None
        self._last_step = -1
        self._ready: set[int] = set()

    # ------------------------------------------------------------------ evaluation
    def _setup(self, trainer: L.Trainer, metric: MetricSet) -> Any:
        """The tokenizer, with ``metric`` set up once on this rank (only the ranks that compute a
        metric set load its data)."""
        tokenizer = trainer.datamodule.tokenizer
        if id(metric) not in self._ready:
            max_length: int = self.max_length or getattr(trainer.datamodule, "max_length", None) or 512
            metric.setup(tokenizer, max_length)
            self._ready.add(id(metric))
        return tokenizer

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Compute every metric set, broadcast, log and record; returns the values.

        Data-parallel metric sets run on every rank, each on its share of the documents, their
        sums added over the ranks; the others on rank 0 (on every rank for a sharded model, whose
        forward passes are collectives). Every rank visits the metric sets in the same order, so
        the collectives of the data-parallel ones meet."""
        step = trainer.global_step
        values: dict[str, float] = {}
        model: Any = model_of(pl_module)
        sharded = is_sharded(model)
        partition = trainer_partition(trainer, sharded)
        start = time.perf_counter()
        for metric in self.metrics:
            if metric.data_parallel and partition.world_size > 1:
                tokenizer = self._setup(trainer, metric)
                values.update(metric.compute(model, tokenizer, partition))  # type: ignore[call-arg]
            elif trainer.is_global_zero or sharded:
                values.update(metric.compute(model, self._setup(trainer, metric)))
        summary = ", ".join(f"{k}={v:.3f}" for k, v in values.items())
        _print(trainer, f"eval @ step {step} ({time.perf_counter() - start:.1f}s): {summary}")
        values = trainer.strategy.broadcast(values)
        log_at_step(trainer, {f"val/{k}": v for k, v in values.items()}, step)
        self.history.append({"step": step, **values})
        self._last_step = step
        self._check_target(trainer, pl_module, values)
        return values

    def _check_target(
        self, trainer: L.Trainer, pl_module: L.LightningModule, values: dict[str, float]
    ) -> None:
        if self.monitor is None or self.matched_step is not None:
            return
        if self.monitor not in values:
            raise KeyError(
                f"UnlearningEvaluator monitor {self.monitor!r} is not among the metrics {sorted(values)}"
            )
        value = values[self.monitor]
        assert self.target is not None
        if (value <= self.target) if self.mode == "below" else (value >= self.target):
            self.matched_step = trainer.global_step
            _print(
                trainer,
                f"matched forgetting: {self.monitor}={value:.3f} reached target {self.target} at step {self.matched_step}",
            )
            run_dir = run_directory(trainer)  # collective under DDP: every rank calls it
            model: Any = model_of(pl_module)
            if self.save_matched_model and hasattr(model, "save_pretrained"):
                full = gathered_state_dict(model)  # collective for a sharded model
                if trainer.is_global_zero:
                    tokenizer = getattr(trainer.datamodule, "tokenizer", None)
                    save_pretrained_atomic(model, tokenizer, run_dir, name="matched_model", state_dict=full)
            if self.stop_on_target:
                trainer.should_stop = True

    @property
    def matched(self) -> dict[str, float] | None:
        """The evaluation at the matched step, if any."""
        return next((h for h in self.history if h["step"] == self.matched_step), None)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0 and not self.history:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "matched_step": self.matched_step, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.matched_step = state_dict.get("matched_step")
        self._last_step = state_dict.get("last_step", -1)


def _print(trainer: L.Trainer, message: str) -> None:
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    if bar is not None and hasattr(bar, "print"):
        bar.print(message)
    else:
        print(message)
