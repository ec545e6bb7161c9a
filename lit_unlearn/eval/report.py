"""Run reports: ``results.json``, TensorBoard trade-off views, and cross-run comparison.

Per run (:class:`TradeoffReport`, rank 0):
- ``results.json``: final / best / matched metrics, the matched-forgetting step, steps, wall time,
  tokens per second (forget + retain positions, padding included, all ranks), peak memory
  (CUDA allocator peak, or the process's peak RSS on CPU), effective batch, synthesizer and objectives with arguments,
  the evaluation history and a geometry summary;
- TensorBoard: a custom-scalars layout (forget vs retain metrics on one chart, synthesis geometry
  on another); every evaluation metric at the matched step as ``matched/<metric>``; an
  ``hparams`` entry whose columns lead with synthesizer, objectives and seed, and whose metrics
  are the matched values (then the last ones); and a trade-off figure (forget metric vs retain
  metric along the evaluation points).
- The end-of-fit summary names the matched point and the saved model separately, and warns when
  the evaluation interval is so coarse that the matched point overshoots the target.

Across runs: :mod:`lit_unlearn.eval.compare` (``scripts/compare_runs.py``).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lit_unlearn.engine.outcome import components, engine_of, step_outcome
from lit_unlearn.eval.callbacks import UnlearningEvaluator
from lit_unlearn.eval.harness import LMEvalCallback
from lit_unlearn.eval.layers import TITLES, LayerGeometryMeans, layer_heatmap_figure
from lit_unlearn.logs import component_args, component_name, log_at_step, rule_name
from lit_unlearn.rundir import RESULTS_FILE, local_run_directory, run_directory, write_json_atomic
from lit_unlearn.synthesis.diagnostics import LAYER_KEYS

SCORE = r"val/{side}_(?!.*(ppl|nll)$).*"  # a side's metrics except perplexities and NLLs
# HParams columns shown first (TensorBoard shows five by default): what tells runs apart.
LEADING_COLUMNS = ("synthesizer", "objectives", "seed")
HEATMAP_EVERY_N_LOGS = 10  # the per-layer heatmap image: every 10 x log_every_n_steps steps, and at the end
GEOMETRY_TAGS = ["train/grad_cosine", "train/update_retain_cosine", "train/update_forget_cosine"]


def _synthesis_path(engine: Any) -> dict[str, Any]:
    """How this process ran the synthesis: compiled kernels or eager, and the compile time."""
    rule = getattr(engine, "synthesizer", None)
    if rule is None or not hasattr(rule, "compiled"):
        return {"compiled": False, "compile_seconds": 0.0}
    return {"compiled": rule.compiled, "compile_seconds": round(rule.compile_seconds, 2)}


def _find(trainer: L.Trainer, cls: type) -> Any:
    return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)


def tradeoff_figure(
    history: Sequence[dict[str, float]], forget_metric: str, retain_metric: str, title: str = ""
) -> Any:
    """Matplotlib figure: retain metric against forget metric at each evaluation point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        (h[forget_metric], h[retain_metric], h["step"])
        for h in history
        if forget_metric in h and retain_metric in h
    ]
    fig, ax = plt.subplots(figsize=(5, 4))
    if points:
        xs, ys, steps = zip(*points)
        ax.plot(xs, ys, "-o", markersize=4)
        for x, y, s in zip(xs, ys, steps):
            ax.annotate(str(s), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if points and all(0.0 <= v <= 1.0 for x, y, _ in points for v in (x, y)):
        # Scores in [0, 1] (accuracies, ROUGE): one fixed scale, so figures of different runs
        # can be compared side by side without each one stretching its own range.
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"{forget_metric} (lower = more forgotten)")
    ax.set_ylabel(f"{retain_metric} (higher = more kept)")
    ax.set_title(title or "unlearning trade-off (labels: step)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


class TradeoffReport(L.Callback):
    """Writes ``results.json`` and the TensorBoard trade-off views of one run (rank 0).

    Args:
        forget_metric: evaluation key plotted as "forgetting" (e.g. ``forget_qa``); ``None`` = the
            evaluator's ``monitor``, else its first ``forget_*`` key.
        retain_metric: evaluation key plotted as "retention" (e.g. ``retain_qa``); ``None`` = the
            evaluator's first ``retain_*`` key.
    """

    def __init__(self, forget_metric: str | None = None, retain_metric: str | None = None) -> None:
        self.forget_metric, self.retain_metric = forget_metric, retain_metric
        self.tokens = 0
        self.geometry: list[dict[str, float]] = []
        self.layers = LayerGeometryMeans()
        self._heatmap_step = -1  # the step of the last heatmap image
        self.elapsed_before = 0.0  # wall seconds of earlier segments of a resumed run
        self._start = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Counters of the run so far, so a resumed run reports the whole run."""
        return {
            "tokens": self.tokens,
            "geometry": list(self.geometry),
            "layer_geometry": self.layers.state_dict(),
            "elapsed": self.elapsed_before + self._elapsed(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.geometry = list(state_dict.get("geometry", []))
        self.layers.load_state_dict(state_dict.get("layer_geometry", {}))
        self.elapsed_before = float(state_dict.get("elapsed", 0.0))

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start if self._start else 0.0

    def _writer(self, trainer: L.Trainer) -> Any:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        writer = self._writer(trainer) if trainer.is_global_zero else None
        if writer is not None:
            writer.add_custom_scalars(
                {
                    "Trade-off": {
                        # Scores on one chart per side, perplexities and NLLs apart: a perplexity of ~6
                        # would flatten accuracies in [0, 1].
                        "forget scores": ["Multiline", [SCORE.format(side="forget")]],
                        "retain and general scores": [
                            "Multiline",
                            [SCORE.format(side="retain"), SCORE.format(side="general")],
                        ],
                        "perplexities and NLLs": ["Multiline", [r"val/.*_(ppl|nll)$"]],
                        "training losses": ["Multiline", ["train/forget_loss", "train/retain_loss"]],
                    },
                    "Synthesis geometry": {
                        "cosines": ["Multiline", GEOMETRY_TAGS],
                        "conflicts": [
                            "Multiline",
                            [
                                "train/conflict_fraction",
                                "train/tensor_conflict_fraction",
                                "train/projected_fraction",
                            ],
                        ],
                        "norms": [
                            "Multiline",
                            ["train/forget_norm", "train/retain_norm", "train/update_norm"],
                        ],
                    },
                    # one line per block / module type (the heatmaps are the images geometry/per_layer/...)
                    "Per-layer geometry": {
                        f"{TITLES[key]} by {side}": ["Multiline", [rf"per_{side}/{key}/.*"]]
                        for key in LAYER_KEYS
                        for side in ("layer", "type")
                    },
                }
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Counted from tensor shapes (padded positions included), so no device sync is needed.
        for part in ("forget", "retain"):
            if isinstance(batch, dict) and part in batch:
                self.tokens += int(batch[part]["attention_mask"].numel())
        engine = engine_of(pl_module)
        geometry = engine.state.last_geometry if engine is not None else None
        if geometry is not None and (not self.geometry or self.geometry[-1]["step"] != geometry["step"]):
            self.geometry.append(dict(geometry))
        outcome = step_outcome(outputs)
        if outcome is not None and outcome.layer_geometry is not None:
            self.layers.add(outcome.step, outcome.layer_geometry)
            # a figure costs ~0.3 s to draw: one per 10 logging intervals, and one at the end
            every = HEATMAP_EVERY_N_LOGS * trainer.log_every_n_steps
            if every and outcome.step % every == 0:
                self._log_heatmap(trainer, pl_module, outcome.step)

    def _log_heatmap(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """The images ``geometry/per_layer/<quantity>``: the per-layer means so far (rank 0)."""
        writer = self._writer(trainer) if trainer.is_global_zero else None
        summary = self.layers.summary()
        if writer is not None and summary is not None and step != self._heatmap_step:
            for key in LAYER_KEYS:
                figure = layer_heatmap_figure(summary, key, _title(components(pl_module)))
                writer.add_figure(f"geometry/per_layer/{key}", figure, step)
            self._heatmap_step = step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = run_directory(trainer)  # collective under DDP: every rank calls it
        if not trainer.is_global_zero:
            return
        results = self.results(trainer, pl_module, run_dir)
        path = os.path.join(run_dir, RESULTS_FILE)
        if os.path.exists(path):  # the CLI refuses such directories up front; never replace silently
            raise FileExistsError(f"{path} already exists; an earlier run's results are never replaced")
        write_json_atomic(path, results)
        self._log_points(trainer, results)
        self._log_hparams(trainer, results)
        writer = self._writer(trainer)
        if writer is not None:
            self._log_figure(trainer, writer, results)
        if self.layers.steps:
            self._log_heatmap(trainer, pl_module, self.layers.steps[-1])
        for line in summary_lines(results):
            print(line)

    def results(
        self, trainer: L.Trainer, pl_module: L.LightningModule, run_dir: str | None = None
    ) -> dict[str, Any]:
        """The ``results.json`` payload (``run_dir``: as resolved on every rank; default: this rank's view)."""
        evaluator = _find(trainer, UnlearningEvaluator)
        history = list(evaluator.history) if evaluator is not None else []
        matched = evaluator.matched if evaluator is not None else None
        keys = [k for h in history for k in h]
        self.forget_metric = (
            self.forget_metric
            or getattr(evaluator, "monitor", None)
            or next((k for k in keys if k.startswith("forget_")), "forget")
        )
        self.retain_metric = self.retain_metric or next(
            (k for k in keys if k.startswith("retain_")), "retain"
        )
        candidates = [
            h for h in history if evaluator is not None and evaluator.monitor and _meets(h, evaluator)
        ]
        best = max(candidates, key=lambda h: h.get(self.retain_metric, float("-inf"))) if candidates else None
        lm_eval_cb = _find(trainer, LMEvalCallback)
        wall = self.elapsed_before + self._elapsed()
        dm = trainer.datamodule
        engine = engine_of(pl_module)
        accumulate = engine.accumulate_grad_batches if engine is not None else 1
        opt = pl_module.optimizers()
        optimizer = opt.optimizer if hasattr(opt, "optimizer") else opt
        peak = (
            torch.cuda.max_memory_allocated()
            if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        return {
            "run_dir": run_dir or local_run_directory(trainer),
            **components(pl_module),
            "optimizer": {"name": type(optimizer).__name__, "lr": optimizer.defaults.get("lr")},
            "forget_metric": self.forget_metric,
            "retain_metric": self.retain_metric,
            "target": {
                "monitor": getattr(evaluator, "monitor", None),
                "value": getattr(evaluator, "target", None),
                "mode": getattr(evaluator, "mode", None),
            },
            "matched_step": evaluator.matched_step if evaluator is not None else None,
            "matched": matched,
            "best": best,
            "final": history[-1] if history else None,
            "history": history,
            "steps": trainer.global_step,
            "skipped_steps": engine.state.skipped_steps if engine is not None else 0,
            "wall_seconds": round(wall, 3),
            "synthesis": _synthesis_path(engine),
            "tokens_per_second": round(self.tokens * trainer.world_size / max(wall, 1e-9), 1),
            "peak_memory_bytes": int(peak),
            "seed": getattr(dm, "seed", None),  # the data order's seed (= --seed_everything from the CLI)
            "world_size": trainer.world_size,
            "effective_batch": {
                t: getattr(dm, f"{t}_batch_size", 0) * accumulate * trainer.world_size
                for t in ("forget", "retain")
            },
            "geometry": {**_geometry_summary(self.geometry), "per_layer": self.layers.summary()},
            "lm_eval": lm_eval_cb.results if lm_eval_cb is not None else {},
        }

    def _log_points(self, trainer: L.Trainer, results: dict[str, Any]) -> None:
        """Every evaluation metric at the matched step as ``matched/<metric>`` (with
        ``matched/step``), at that step: single points that the HParams columns and a reader of
        the event files take without lining up curves by step."""
        point = results["matched"]
        if point:
            values = {f"matched/{k}": float(v) for k, v in point.items() if isinstance(v, (int, float))}
            log_at_step(trainer, values, int(point["step"]))

    def _log_hparams(self, trainer: L.Trainer, results: dict[str, Any]) -> None:
        """The HParams view: one row per run; the columns that tell runs apart first (synthesizer,
        objectives, seed), then lr, α, γ; the metric columns are the matched values of the
        forget, retain and general metrics and the matched step, then the last values (named
        ``last/...``). Through each logger's ``log_hyperparams``; a :class:`RunLogger` writes the
        HParams entry (other loggers get the columns only)."""
        from lit_unlearn.rundir import RunLogger

        synthesizer = results["synthesizer"]
        params = {
            "synthesizer": rule_name(synthesizer),
            # one column for both objectives: the first five columns are the ones shown, and the
            # matched retain value must stay on a 1,600-pixel screen
            "objectives": f"{component_name(results['forget_objective'])}+{component_name(results['retain_objective'])}",
            "seed": int(getattr(trainer.datamodule, "seed", 0) or 0),
            "lr": float(results["optimizer"]["lr"] or 0.0),
            "forget_weight": float(component_args(synthesizer).get("forget_weight", 1.0)),
            # a rule without a retain weight (GRU) does not add the retain gradient to the update
            "retain_weight": float(component_args(synthesizer).get("retain_weight", 0.0)),
        }
        columns = hparams_metric_columns(results)
        metrics = {tag: 0.0 for tag, _ in columns}  # the values are the logged points, read by TensorBoard
        for logger in trainer.loggers:
            if isinstance(logger, RunLogger):
                logger.log_hyperparams(params, metrics, leading=LEADING_COLUMNS, names=dict(columns))
            else:
                logger.log_hyperparams(params)

    def _log_figure(self, trainer: L.Trainer, writer: Any, results: dict[str, Any]) -> None:
        fig = tradeoff_figure(
            results["history"],
            results["forget_metric"],
            results["retain_metric"],
            _title(results),
        )
        writer.add_figure("tradeoff/forget_vs_retain", fig, trainer.global_step)
        writer.flush()


def _title(parts: dict[str, Any]) -> str:
    """``<forget objective> + <rule>`` from described components (``results.json`` or
    :func:`components`), for figure titles ("" without a synthesizer)."""
    if parts.get("synthesizer") is None:
        return ""
    return f"{component_name(parts['forget_objective'])} + {rule_name(parts['synthesizer'])}"


def _values(point: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={point[k]:.3f}" for k in keys if k in point) or "no metrics"


def _headline_keys(results: dict[str, Any], point: dict[str, Any]) -> list[str]:
    keys = [k for k in (results.get("forget_metric"), results.get("retain_metric")) if k]
    return keys + [k for k in point if k.startswith("general_") and k not in keys][:1]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The end-of-fit summary: the matched point (the first evaluation that reached the
    forgetting target: the point methods are compared at) and the saved model (the weights in
    ``unlearned_model/``, evaluated at the last step), each named as such, and a warning when
    the matched point overshot the target by more than half of it."""
    steps = results.get("steps")
    final, matched = results.get("final") or {}, results.get("matched")
    target = results.get("target") or {}
    head = f"lit-unlearn: {steps} optimizer step{'' if steps == 1 else 's'}; "
    lines: list[str] = []
    saved = f"saved model (step {steps}, unlearned_model/)"
    if not final:
        return [head + "no evaluations"]
    saved_values = _values(final, _headline_keys(results, final))
    if final.get("step") != steps:
        saved += f" — last evaluated at step {final.get('step')}"
    if matched:
        rule = (
            f"{target.get('monitor')} {'<=' if target.get('mode') != 'above' else '>='} {target.get('value')}"
        )
        if matched.get("step") == steps:
            lines.append(
                f"lit-unlearn: matched point = {saved} (first evaluation with {rule}): {saved_values}"
            )
        else:
            lines.append(
                f"lit-unlearn: matched point (step {matched.get('step')}, first evaluation with {rule}): "
                f"{_values(matched, _headline_keys(results, matched))}"
            )
            lines.append(f"lit-unlearn: {saved}: {saved_values}")
    else:
        if target.get("monitor"):
            lines.append(
                f"lit-unlearn: forgetting target {target.get('monitor')} {target.get('value')} not reached"
            )
        lines.append(f"lit-unlearn: {saved}: {saved_values}")
    lines[0] = head + lines[0].removeprefix("lit-unlearn: ")
    warning = overshoot_warning(results)
    if warning:
        lines.append(f"lit-unlearn: warning: {warning}")
    return lines


def overshoot_warning(results: dict[str, Any]) -> str | None:
    """A sentence when the matched evaluation landed past the target by more than half the
    target's value (the evaluations are too far apart to say where the target was crossed);
    ``None`` otherwise."""
    matched, target = results.get("matched"), results.get("target") or {}
    monitor, value = target.get("monitor"), target.get("value")
    if not matched or monitor not in matched or not value:
        return None
    reached = float(matched[monitor])
    past = (float(value) - reached) if target.get("mode") != "above" else (reached - float(value))
    if past <= 0.5 * abs(float(value)):
        return None
    history = [h for h in results.get("history") or [] if monitor in h and h["step"] < matched["step"]]
    before = f"{history[-1][monitor]:.3f} (step {history[-1]['step']}) -> " if history else ""
    return (
        f"the matched point overshot the target: {monitor} went {before}{reached:.3f} "
        f"(step {matched['step']}), {past:.3f} past the target {value} (more than half of it); "
        "evaluate more often (UnlearningEvaluator every_n_steps) to match forgetting closely"
    )


def _meets(entry: dict[str, float], evaluator: Any) -> bool:
    value = entry.get(evaluator.monitor)
    if value is None:
        return False
    return value <= evaluator.target if evaluator.mode == "below" else value >= evaluator.target


def _geometry_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    summary: dict[str, float] = {"points": float(len(rows))}
    for key in ("grad_cosine", "update_retain_cosine", "conflict_fraction", "tensor_conflict_fraction"):
        values = [r[key] for r in rows if key in r]
        if values:
            summary[f"mean_{key}"] = sum(values) / len(values)
            summary[f"min_{key}"] = min(values)
    return summary


def hparams_metric_columns(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The HParams metric columns as (scalar tag, column name), in order: the matched forget,
    retain and general values and the matched step (TensorBoard shows the first five), the
    other matched values, then the last values: the ``val/<metric>`` curves' last points,
    named ``last/<metric>``."""
    point = results.get("final") or {}
    names = [k for k in point if k != "step" and isinstance(point[k], (int, float))]
    first = [k for k in _headline_keys(results, point) if k in names]
    rest = [k for k in names if k not in first]
    matched = [f"matched/{k}" for k in first] + (["matched/step"] if names else [])
    matched += [f"matched/{k}" for k in rest]
    return [(tag, tag) for tag in matched] + [(f"val/{k}", f"last/{k}") for k in first + rest]
