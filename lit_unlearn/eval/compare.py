"""Compare unlearning runs at matched forgetting: which method keeps more at equal forgetting?

:func:`compare_runs` reads the ``results.json`` of every run below the folders given, groups the
runs into methods (synthesizer, objectives, learning rate and their arguments: everything but the
seed), counts seeds by their value (a second run with a seed already seen is reported as a
duplicate and left out of the statistics), and reports each method's mean ± standard deviation at
its matched point (the first evaluation that reached the forgetting target; a run that never
reached it is counted at its last evaluation and shown as not matched).

It writes into the output folder: ``pareto.png`` (retain against forget, one colour per method:
each seed's trajectory thin, the mean ± std at matched forgetting as a marker with error bars,
the forgetting target as a line, the retrain oracle when given), ``comparison.json`` (every run and
every method), and a TensorBoard run ``comparison/`` holding the same figure
(``tradeoff/retain_vs_forget``), retain and general at matched forgetting per method
(``tradeoff/at_matched_forgetting``) and both tables as text (``tradeoff/methods``,
``tradeoff/runs``), so ``tensorboard --logdir <folder>`` shows the comparison next to the runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from typing import Any

from lit_unlearn.logs import component_args, component_name, rule_name
from lit_unlearn.rundir import RESULTS_FILE, write_json_atomic

COMPARISON_RUN = "comparison"  # the TensorBoard run the comparison writes below the output folder
COLUMNS = ("step", "forget", "retain", "general", "cos_u_gr", "seconds")


def load_results(folders: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(run directory, results)`` for every ``results.json`` in or below the folders given,
    in path order."""
    found = []
    for root in folders:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such run directory or folder")
        paths = sorted(
            os.path.join(d, RESULTS_FILE) for d, _, files in os.walk(root) if RESULTS_FILE in files
        )
        if not paths:
            raise FileNotFoundError(f"{root}: no {RESULTS_FILE} found in it or below it")
        for path in paths:
            try:
                with open(path, encoding="utf-8") as handle:
                    found.append((os.path.dirname(path), json.load(handle)))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}: not a readable results file ({err})") from err
    unique = {os.path.realpath(d): (d, r) for d, r in found}  # a run reached through two folders
    return sorted(unique.values(), key=lambda item: item[0])


def _seed(run_dir: str, results: dict[str, Any]) -> int | None:
    """The run's seed: ``results.json`` (``seed``), else its ``manifest.json``, else unknown."""
    if isinstance(results.get("seed"), int):
        return int(results["seed"])
    try:
        with open(os.path.join(run_dir, "manifest.json"), encoding="utf-8") as handle:
            seed = json.load(handle).get("seed")
    except (OSError, json.JSONDecodeError):
        return None
    return int(seed) if isinstance(seed, int) else None


def _setting(results: dict[str, Any]) -> str:
    """Everything that defines a method except the seed, as a canonical string."""
    parts = {
        key: results.get(key)
        for key in ("synthesizer", "forget_objective", "retain_objective", "forget_metric", "retain_metric")
    }
    parts["lr"] = (results.get("optimizer") or {}).get("lr")
    return json.dumps(parts, sort_keys=True, default=str)


def run_rows(
    runs: Sequence[tuple[str, dict[str, Any]]], general_metric: str | None = None, root: str | None = None
) -> list[dict[str, Any]]:
    """One row per run: its name (relative to ``root``), seed, method, the matched (or last)
    point, the geometry summary, and ``duplicate_of`` (the run that already holds this seed of this
    method, or ``None``)."""
    rows: list[dict[str, Any]] = []
    for run_dir, r in runs:
        point = r.get("matched") or r.get("final") or {}
        fm, rm = r.get("forget_metric"), r.get("retain_metric")
        geo = r.get("geometry") or {}
        general = general_metric or next((k for k in point if k.startswith("general_")), None)
        rows.append(
            {
                "run": os.path.relpath(run_dir, root) if root else run_dir,
                "seed": _seed(run_dir, r),
                "synthesizer": rule_name(r["synthesizer"]),
                "objective": f"{component_name(r['forget_objective'])}+{component_name(r['retain_objective'])}",
                "lr": (r.get("optimizer") or {}).get("lr"),
                "setting": _setting(r),
                "matched": bool(r.get("matched")),
                "step": point.get("step"),
                "forget": point.get(fm),
                "retain": point.get(rm),
                "general": point.get(general) if general else None,
                "cos_u_gr": geo.get("mean_update_retain_cosine"),
                "min_cos_u_gr": geo.get("min_update_retain_cosine"),
                "conflict": geo.get("mean_conflict_fraction"),
                "seconds": r.get("wall_seconds"),
                "forget_metric": fm,
                "retain_metric": rm,
                "general_metric": general,
                "target": r.get("target") or {},
                "trajectory": [(h[fm], h[rm]) for h in r.get("history") or [] if fm in h and rm in h],
                "args": component_args(r["synthesizer"]),
                "duplicate_of": None,
            }
        )
    _label_methods(rows)
    seen: dict[tuple[str, int], str] = {}
    for row in rows:
        if row["seed"] is None:
            continue
        key = (str(row["setting"]), int(row["seed"]))
        if key in seen:
            row["duplicate_of"] = seen[key]
        else:
            seen[key] = row["run"]
    return rows


def _label_methods(rows: list[dict[str, Any]]) -> None:
    """``method``: the synthesizer's name, plus what tells settings with the same synthesizer
    apart (objectives, lr, the synthesizer's arguments), only when it is needed."""
    settings: dict[str, dict[str, Any]] = {}
    for row in rows:
        settings.setdefault(row["setting"], row)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for first in settings.values():
        by_name.setdefault(first["synthesizer"], []).append(first)
    labels: dict[str, str] = {}
    several_objectives = len({r["objective"] for r in rows}) > 1
    for name, firsts in by_name.items():
        for first in firsts:
            extra = [first["objective"]] if several_objectives else []
            if len(firsts) > 1:
                if len({f["lr"] for f in firsts}) > 1:
                    extra.append(
                        f"lr {first['lr']:g}" if isinstance(first["lr"], float) else f"lr {first['lr']}"
                    )
                differing = sorted(
                    k
                    for k in first["args"]
                    if k != "aggregator" and len({json.dumps(f["args"].get(k)) for f in firsts}) > 1
                )
                extra += [f"{k}={first['args'][k]}" for k in differing]
            labels[first["setting"]] = f"{name} ({', '.join(extra)})" if extra else name
    for row in rows:
        row["method"] = labels[row["setting"]]


def method_summaries(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (in order of first appearance), over its distinct seeds: ``n`` seeds,
    ``matched`` (how many reached the target), ``duplicates`` (runs left out) and
    ``<column>_mean`` / ``_std`` (sample standard deviation; 0 for one seed) / ``_min`` / ``_max``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    out = []
    for method, members in groups.items():
        counted = [m for m in members if m["duplicate_of"] is None]
        entry: dict[str, Any] = {
            "method": method,
            "synthesizer": members[0]["synthesizer"],
            "objective": members[0]["objective"],
            "n": len(counted),
            "seeds": sorted(m["seed"] for m in counted if m["seed"] is not None),
            "matched": sum(m["matched"] for m in counted),
            "duplicates": len(members) - len(counted),
        }
        for col in COLUMNS:
            values = [float(m[col]) for m in counted if isinstance(m.get(col), (int, float))]
            if values:
                entry[f"{col}_mean"] = statistics.fmean(values)
                entry[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                entry[f"{col}_min"], entry[f"{col}_max"] = min(values), max(values)
        out.append(entry)
    return out


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _pm(entry: dict[str, Any], col: str, digits: int = 3) -> str:
    if f"{col}_mean" not in entry:
        return "-"
    return f"{entry[f'{col}_mean']:.{digits}f} ± {entry[f'{col}_std']:.{digits}f}"


def _metric_names(rows: Sequence[dict[str, Any]]) -> tuple[str, str, str]:
    first = rows[0] if rows else {}
    return (
        first.get("forget_metric") or "forget",
        first.get("retain_metric") or "retain",
        first.get("general_metric") or "general",
    )


def runs_table(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The per-run table (header first)."""
    fm, rm, gm = _metric_names(rows)
    table = [["run", "seed", "method", "matched", "step", fm, rm, gm, "cos(u,g_r)", "min", "conflict", "sec"]]
    for r in rows:
        table.append(
            [
                r["run"],
                "?" if r["seed"] is None else str(r["seed"]),
                r["method"],
                ("yes" if r["matched"] else "no")
                + (f" (duplicate of {r['duplicate_of']})" if r["duplicate_of"] else ""),
                "-" if r["step"] is None else str(r["step"]),
                _num(r["forget"]),
                _num(r["retain"]),
                _num(r["general"]),
                _num(r["cos_u_gr"]),
                _num(r["min_cos_u_gr"], 2),
                _num(r["conflict"]),
                _num(r["seconds"], 1),
            ]
        )
    return table


def methods_table(rows: Sequence[dict[str, Any]], methods: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The per-method table of mean ± std (header first)."""
    fm, rm, gm = _metric_names(rows)
    table = [["method", "seeds", "matched", "step", fm, rm, gm, "cos(u,g_r)"]]
    for e in methods:
        seeds = f"{e['n']}" + (f" (+{e['duplicates']} duplicate)" if e["duplicates"] else "")
        table.append(
            [
                e["method"],
                seeds,
                f"{e['matched']}/{e['n']}",
                _pm(e, "step", 0),
                _pm(e, "forget"),
                _pm(e, "retain"),
                _pm(e, "general"),
                _pm(e, "cos_u_gr", 2),
            ]
        )
    return table


def format_text(table: list[list[str]]) -> str:
    """Aligned plain text: names (run, method) left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    left = {i for i, name in enumerate(table[0]) if name in ("run", "method", "matched")}
    lines = []
    for n, row in enumerate(table):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_markdown(table: list[list[str]]) -> str:
    """A Markdown table (TensorBoard's text dashboard renders it)."""
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table[1:]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
def _target_of(rows: Sequence[dict[str, Any]]) -> tuple[float, str] | None:
    """The forgetting target shared by every run whose monitor is the plotted forget metric."""
    targets = {
        (r["target"].get("value"), r["target"].get("mode"))
        for r in rows
        if r["target"].get("monitor") == r["forget_metric"] and r["target"].get("value") is not None
    }
    if len(targets) != 1:
        return None
    value, mode = targets.pop()
    return float(value), "≥" if mode == "above" else "≤"


def tradeoff_comparison_figure(
    rows: Sequence[dict[str, Any]], methods: Sequence[dict[str, Any]], oracle: dict[str, float] | None = None
) -> Any:
    """Retain against forget: one colour per method; each seed's trajectory as a thin line, the
    method's mean ± std at matched forgetting as a marker with error bars; the forgetting target
    as a dashed line; the retrain oracle as a black star when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fm, rm, _ = _metric_names(rows)
    colours = plt.get_cmap("tab10")
    markers = "osD^vP*Xh<>"
    fig, ax = plt.subplots(figsize=(7, 5))
    xs_all: list[float] = []
    ys_all: list[float] = []
    for i, entry in enumerate(methods):
        colour = colours(i % 10)
        for row in rows:
            if row["method"] != entry["method"] or row["duplicate_of"] or not row["trajectory"]:
                continue
            xs, ys = zip(*row["trajectory"])
            xs_all += xs
            ys_all += ys
            ax.plot(xs, ys, "-", color=colour, linewidth=0.8, alpha=0.35)
        if "forget_mean" in entry and "retain_mean" in entry:
            label = (
                f"{entry['method']}: {rm} {_pm(entry, 'retain')} at {fm} {_pm(entry, 'forget')} "
                f"({entry['matched']}/{entry['n']} seeds matched)"
            )
            ax.errorbar(
                entry["forget_mean"],
                entry["retain_mean"],
                xerr=entry["forget_std"],
                yerr=entry["retain_std"],
                color=colour,
                marker=markers[i % len(markers)],
                markersize=9,
                markeredgecolor="black",
                capsize=4,
                linewidth=1.5,
                label=label,
                zorder=3,
            )
            xs_all.append(entry["forget_mean"])
            ys_all.append(entry["retain_mean"] - entry["retain_std"])
    target = _target_of(rows)
    if target is not None:
        ax.axvline(
            target[0],
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"target: {fm} {target[1]} {target[0]:g}",
        )
    if oracle and fm in oracle and rm in oracle:
        ax.plot(oracle[fm], oracle[rm], "*", color="black", markersize=14, label="retrain oracle", zorder=4)
        xs_all.append(oracle[fm])
        ys_all.append(oracle[rm])
    if ys_all and all(0.0 <= v <= 1.0 for v in xs_all + ys_all):
        # scores in [0, 1]: the whole forget axis (the region near the target must be on it); the
        # retain axis from a round value below the lowest point, so close methods stay apart
        low = min(ys_all)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(max(0.0, math.floor((low - 0.05) * 10) / 10) - 0.02, 1.02)
    ax.set_xlabel(f"{fm} (lower = more forgotten)")
    ax.set_ylabel(f"{rm} (higher = more kept)")
    ax.set_title(
        "retention against forgetting (thin: each seed; marker: mean ± std at matched forgetting)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def matched_bars_figure(rows: Sequence[dict[str, Any]], methods: Sequence[dict[str, Any]]) -> Any:
    """Retain and general metric at matched forgetting per method, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fm, rm, gm = _metric_names(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    columns = [c for c in ("retain", "general") if any(f"{c}_mean" in e for e in methods)]
    width = 0.8 / max(len(columns), 1)
    for j, (col, name) in enumerate((c, rm if c == "retain" else gm) for c in columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(methods))]
        means = [e.get(f"{col}_mean", 0.0) for e in methods]
        stds = [e.get(f"{col}_std", 0.0) for e in methods]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=4, label=name, alpha=0.85)
        for bar, mean, std in zip(bars, means, stds):
            ax.annotate(
                f"{mean:.3f}±{std:.3f}",
                (bar.get_x() + bar.get_width() / 2, mean + std),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(
        [f"{e['method']}\n{fm} {_pm(e, 'forget')}\n{e['matched']}/{e['n']} matched" for e in methods],
        fontsize=8,
    )
    ax.set_ylabel("at matched forgetting (mean ± std over seeds)")
    ax.set_title("what each method keeps at matched forgetting", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower center", ncol=2, framealpha=0.9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ outputs
def write_tensorboard(
    out_dir: str,
    rows: Sequence[dict[str, Any]],
    methods: Sequence[dict[str, Any]],
    oracle: dict[str, float] | None,
) -> str:
    """Write the comparison as the TensorBoard run ``<out_dir>/comparison`` (replaced whole, so a
    second comparison of the same folder does not stack on the first). Returns its path."""
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    target = os.path.join(out_dir, COMPARISON_RUN)
    staging = tempfile.mkdtemp(prefix=f".{COMPARISON_RUN}-", dir=out_dir)
    try:
        writer = SummaryWriter(staging)
        for tag, fig in (
            ("tradeoff/retain_vs_forget", tradeoff_comparison_figure(rows, methods, oracle)),
            ("tradeoff/at_matched_forgetting", matched_bars_figure(rows, methods)),
        ):
            writer.add_figure(tag, fig, 0)
            plt.close(fig)
        writer.add_text("tradeoff/methods", format_markdown(methods_table(rows, methods)), 0)
        writer.add_text("tradeoff/runs", format_markdown(runs_table(rows)), 0)
        writer.close()
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def output_folder(folders: Sequence[str]) -> str:
    """Where a comparison goes by default: the folder given, or the folders' common parent."""
    if len(folders) == 1:
        return folders[0]
    return os.path.commonpath([os.path.abspath(f) for f in folders])


def compare_runs(
    folders: Sequence[str],
    out_dir: str | None = None,
    general_metric: str | None = None,
    oracle: dict[str, float] | None = None,
    write: bool = True,
    show: bool = True,
) -> dict[str, Any]:
    """Compare every run in or below ``folders`` (see the module docstring).

    Args:
        folders: run directories or folders holding runs.
        out_dir: where ``pareto.png``, ``comparison.json`` and the ``comparison/`` TensorBoard run
            go (default: :func:`output_folder`).
        general_metric: the key of the "general" column (default: each run's first ``general_*``).
        oracle: the retrain oracle's metrics (same keys as the runs'), drawn as a reference.
        write: write the files (else only return and print).
        show: print the two tables.

    Returns:
        ``{"runs": [...], "methods": [...], "oracle": ..., "outputs": {...}}``.
    """
    out_dir = out_dir or output_folder(folders)
    rows = run_rows(load_results(folders), general_metric, root=out_dir)
    methods = method_summaries(rows)
    if show:
        print(format_text(runs_table(rows)))
        print(
            "\nper method, mean ± std over distinct seeds, at matched forgetting (or the last evaluation if not matched):"
        )
        print(format_text(methods_table(rows, methods)))
        duplicates = [r for r in rows if r["duplicate_of"]]
        if duplicates:
            print(
                f"{len(duplicates)} run(s) repeat a seed already counted and are left out of the statistics: "
                + ", ".join(f"{r['run']} (= {r['duplicate_of']})" for r in duplicates)
            )
    public = [
        {k: v for k, v in r.items() if k not in ("trajectory", "setting", "args", "target")} for r in rows
    ]
    result: dict[str, Any] = {"runs": public, "methods": methods, "oracle": oracle, "outputs": {}}
    if write:
        import matplotlib.pyplot as plt

        os.makedirs(out_dir, exist_ok=True)
        png = os.path.join(out_dir, "pareto.png")
        fig = tradeoff_comparison_figure(rows, methods, oracle)
        staging = png + ".tmp.png"
        fig.savefig(staging, dpi=120)
        plt.close(fig)
        os.replace(staging, png)
        result["outputs"] = {
            "png": png,
            "json": os.path.join(out_dir, "comparison.json"),
            "tensorboard": write_tensorboard(out_dir, rows, methods, oracle),
        }
        write_json_atomic(result["outputs"]["json"], result)
        if show:
            print(
                f"\nplot: {png}\nTensorBoard: tensorboard --logdir {out_dir}   (the comparison is the run '{COMPARISON_RUN}')"
            )
    return result
