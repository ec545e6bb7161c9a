"""Run reports: ``results.json``, TensorBoard trade-off views, and cross-run comparison.

Per run (:class:`TradeoffReport`, rank 0):
- ``results.json``: final / best / matched metrics, the matched-forgetting step, steps, wall time,
  tokens per second (forget + retain positions, padding included, all ranks), peak memory
  (CUDA allocator peak, or the process's peak RSS on CPU), effective batch, synthesizer and objectives with arguments,
  the evaluation history and a geometry summary;
- TensorBoard: a custom-scalars layout (forget vs retain metrics on one chart, synthesis geometry
  on another), an ``hparams`` entry (synthesizer, objectives, α, γ, lr, seed) whose metrics are the
  ``val/*`` evaluation curves themselves (the dashboard reads their last value), and a
  trade-off figure (forget metric vs retain metric along the evaluation points).

Across runs (:func:`compare_runs`, also ``scripts/compare_runs.py``): a table of retention at
matched forgetting per synthesizer × objective with the geometry summary, and a Pareto plot.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lit_unlearn.engine.outcome import components, engine_of
from lit_unlearn.eval.callbacks import UnlearningEvaluator
from lit_unlearn.eval.harness import LMEvalCallback
from lit_unlearn.logs import component_args, component_name
from lit_unlearn.rundir import RESULTS_FILE, local_run_directory, run_directory, write_json_atomic

SCORE = r"val/{side}_(?!.*(ppl|nll)$).*"  # a side's metrics except perplexities and NLLs
GEOMETRY_TAGS = ["train/grad_cosine", "train/update_retain_cosine", "train/update_forget_cosine"]


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
        self.elapsed_before = 0.0  # wall seconds of earlier segments of a resumed run
        self._start = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Counters of the run so far, so a resumed run reports the whole run."""
        return {
            "tokens": self.tokens,
            "geometry": list(self.geometry),
            "elapsed": self.elapsed_before + self._elapsed(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.geometry = list(state_dict.get("geometry", []))
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

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = run_directory(trainer)  # collective under DDP: every rank calls it
        if not trainer.is_global_zero:
            return
        results = self.results(trainer, pl_module, run_dir)
        path = os.path.join(run_dir, RESULTS_FILE)
        if os.path.exists(path):  # the CLI refuses such directories up front; never replace silently
            raise FileExistsError(f"{path} already exists; an earlier run's results are never replaced")
        write_json_atomic(path, results)
        self._log_hparams(trainer, results)
        writer = self._writer(trainer)
        if writer is not None:
            self._log_figure(trainer, writer, results)
        print(summary_line(results))
        print(f"lit-unlearn: results in {os.path.join(run_dir, RESULTS_FILE)}")

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
            "tokens_per_second": round(self.tokens * trainer.world_size / max(wall, 1e-9), 1),
            "peak_memory_bytes": int(peak),
            "world_size": trainer.world_size,
            "effective_batch": {
                t: getattr(dm, f"{t}_batch_size", 0) * accumulate * trainer.world_size
                for t in ("forget", "retain")
            },
            "geometry": _geometry_summary(self.geometry),
            "lm_eval": lm_eval_cb.results if lm_eval_cb is not None else {},
        }

    def _log_hparams(self, trainer: L.Trainer, results: dict[str, Any]) -> None:
        """The HParams view: one row per run, the columns that tell runs apart, and the final
        evaluation values. Through each logger's ``log_hyperparams``; a :class:`RunLogger` points the
        metric columns at the existing ``val/*`` curves (other loggers get the columns only, so
        nothing writes single-point copies of the curves)."""
        from lit_unlearn.rundir import RunLogger

        final = results["final"] or {}
        params = {
            "synthesizer": component_name(results["synthesizer"]),
            "forget_objective": component_name(results["forget_objective"]),
            "retain_objective": component_name(results["retain_objective"]),
            "lr": float(results["optimizer"]["lr"] or 0.0),
            "forget_weight": float(component_args(results["synthesizer"]).get("forget_weight", 1.0)),
            "retain_weight": float(component_args(results["synthesizer"]).get("retain_weight", 1.0)),
            "seed": int(getattr(trainer.datamodule, "seed", 0) or 0),
        }
        metrics = {
            f"val/{k}": float(v) for k, v in final.items() if k != "step" and isinstance(v, (int, float))
        }
        for logger in trainer.loggers:
            if isinstance(logger, RunLogger):
                logger.log_hyperparams(params, metrics)
            else:
                logger.log_hyperparams(params)

    def _log_figure(self, trainer: L.Trainer, writer: Any, results: dict[str, Any]) -> None:
        fig = tradeoff_figure(
            results["history"],
            results["forget_metric"],
            results["retain_metric"],
            f"{component_name(results['forget_objective'])} + {component_name(results['synthesizer'])}",
        )
        writer.add_figure("tradeoff/forget_vs_retain", fig, trainer.global_step)
        writer.flush()


def summary_line(results: dict[str, Any]) -> str:
    """One line for the end of fit: steps, and the forget / retain / general values at the matched
    evaluation (or the last one if the target was not reached)."""
    point = results.get("matched") or results.get("final") or {}
    keys = [results.get("forget_metric"), results.get("retain_metric")]
    keys += [k for k in point if k.startswith("general_") and k not in keys][:1]
    values = ", ".join(f"{k}={point[k]:.3f}" for k in keys if k in point)
    if results.get("matched_step") is not None:
        where = f"matched forgetting at step {results['matched_step']}"
    elif results.get("target", {}).get("monitor"):
        where = "target not reached; last evaluation"
    else:
        where = "last evaluation"
    return f"lit-unlearn: {results.get('steps')} optimizer steps; {where}: {values or 'no evaluations'}"


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


# ---------------------------------------------------------------------- across runs
def load_results(run_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """``results.json`` of every run directory given (a directory may also hold runs below it)."""
    found = []
    for root in run_dirs:
        paths = (
            [os.path.join(root, RESULTS_FILE)]
            if os.path.exists(os.path.join(root, RESULTS_FILE))
            else sorted(
                os.path.join(d, RESULTS_FILE) for d, _, files in os.walk(root) if RESULTS_FILE in files
            )
        )
        if not paths:
            raise FileNotFoundError(f"{root}: no {RESULTS_FILE} found")
        for path in paths:
            with open(path) as handle:
                found.append(json.load(handle))
    return found


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when forgetting (x) is minimised and retention (y) maximised."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _first_general(point: dict[str, Any]) -> str:
    return next((k for k in point if k.startswith("general_")), "")


def compare_runs(
    run_dirs: Sequence[str], out_png: str | None = "pareto.png", general_metric: str | None = None
) -> list[dict[str, Any]]:
    """Print retention at matched forgetting per synthesizer × objective and save a Pareto plot.

    ``general_metric`` names the "general" column (default: each run's first ``general_*``
    metric, whatever the benchmark calls it). Returns the table rows. Runs that never reached the target are reported at their final
    evaluation and marked ``no``.
    """
    runs = load_results(run_dirs)
    rows = []
    for r in runs:
        point = r.get("matched") or r.get("final") or {}
        fm, rm = r["forget_metric"], r["retain_metric"]
        geo = r.get("geometry", {})
        rows.append(
            {
                "synthesizer": component_name(r["synthesizer"]),
                "objective": f"{component_name(r['forget_objective'])}+{component_name(r['retain_objective'])}",
                "matched": "yes" if r.get("matched") else "no",
                "step": point.get("step"),
                "forget": point.get(fm),
                "retain": point.get(rm),
                "general": point.get(general_metric or _first_general(point)),
                "cos_u_gr": geo.get("mean_update_retain_cosine"),
                "min_cos_u_gr": geo.get("min_update_retain_cosine"),
                "conflict": geo.get("mean_conflict_fraction"),
                "seconds": r.get("wall_seconds"),
                "run_dir": r.get("run_dir"),
                "_history": r.get("history", []),
                "_metrics": (fm, rm),
            }
        )
    header = f"{'synthesizer':<18}{'objective':<22}{'matched':>8}{'step':>6}{'forget':>8}{'retain':>8}{'general':>9}{'cos(u,g_r)':>12}{'min':>7}{'conflict':>10}{'sec':>7}"
    print(header)
    print("-" * len(header))
    fmt = lambda v, w, p=3: f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    for row in rows:
        print(
            f"{row['synthesizer']:<18}{row['objective']:<22}{row['matched']:>8}{row['step'] if row['step'] is not None else '-':>6}"
            f"{fmt(row['forget'], 8)}{fmt(row['retain'], 8)}{fmt(row['general'], 9)}{fmt(row['cos_u_gr'], 12)}"
            f"{fmt(row['min_cos_u_gr'], 7, 2)}{fmt(row['conflict'], 10)}{fmt(row['seconds'], 7, 1)}"
        )
    if out_png:
        _pareto_plot(rows, out_png)
        print(f"Pareto plot: {out_png}")
    for row in rows:
        row.pop("_history")
        row.pop("_metrics")
    return rows


def _pareto_plot(rows: list[dict[str, Any]], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = []
    for row in rows:
        fm, rm = row["_metrics"]
        traj = [(h[fm], h[rm]) for h in row["_history"] if fm in h and rm in h]
        label = f"{row['synthesizer']} ({row['objective']})"
        if traj:
            xs, ys = zip(*traj)
            line = ax.plot(xs, ys, "-o", alpha=0.5, markersize=3, label=label)[0]
            if row["forget"] is not None and row["retain"] is not None:
                ax.plot(row["forget"], row["retain"], "*", markersize=12, color=line.get_color())
        if row["forget"] is not None and row["retain"] is not None:
            points.append((row["forget"], row["retain"]))
    front = sorted((points[i] for i in pareto_front(points)), key=lambda p: p[0])
    if front:
        ax.plot(*zip(*front), "k--", linewidth=1, label="Pareto front (matched points)")
    fm, rm = rows[0]["_metrics"] if rows else ("forget", "retain")
    ax.set_xlabel(f"{fm} (lower = more forgotten)")
    ax.set_ylabel(f"{rm} (higher = more kept)")
    ax.set_title("retention vs forgetting (★ = matched / final point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def summarize_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group :func:`compare_runs` rows by synthesizer × objective (the seeds of one setting) and
    print mean ± standard deviation of each column at the matched (or final) point.

    Returns one dict per group: ``n``, ``matched`` (how many seeds reached the target) and
    ``<column>_mean`` / ``<column>_std`` / ``<column>_min`` / ``<column>_max``.
    """
    import statistics

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["synthesizer"], row["objective"]), []).append(row)
    columns = ("step", "forget", "retain", "general", "cos_u_gr", "seconds")
    out = []
    for (synth, objective), members in groups.items():
        entry: dict[str, Any] = {
            "synthesizer": synth,
            "objective": objective,
            "n": len(members),
            "matched": sum(m["matched"] == "yes" for m in members),
        }
        for col in columns:
            values = [float(m[col]) for m in members if isinstance(m.get(col), (int, float))]
            if values:
                entry[f"{col}_mean"] = statistics.fmean(values)
                entry[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                entry[f"{col}_min"], entry[f"{col}_max"] = min(values), max(values)
        out.append(entry)
    header = f"{'synthesizer':<18}{'objective':<22}{'seeds':>6}{'matched':>8}{'step':>13}{'forget':>15}{'retain':>15}{'general':>15}{'cos(u,g_r)':>12}"
    print(header)
    print("-" * len(header))

    def cell(entry: dict[str, Any], col: str, width: int, digits: int = 3) -> str:
        if f"{col}_mean" not in entry:
            return f"{'-':>{width}}"
        return f"{entry[f'{col}_mean']:.{digits}f} ± {entry[f'{col}_std']:.{digits}f}".rjust(width)

    for e in out:
        print(
            f"{e['synthesizer']:<18}{e['objective']:<22}{e['n']:>6}{e['matched']:>8}{cell(e, 'step', 13, 0)}"
            f"{cell(e, 'forget', 15)}{cell(e, 'retain', 15)}{cell(e, 'general', 15)}{cell(e, 'cos_u_gr', 12, 2)}"
        )
    return out
