"""Study: retention-first synthesis against symmetric multi-task aggregation, at matched forgetting.

    python scripts/study_rules.py [--out runs/study_rules] [--workers 2]     # ~17 minutes on 2 cores
    python scripts/study_rules.py --objectives graddiff --rules naive sago --seeds 0   # a slice
    python scripts/study_rules.py --objectives wga satimp undial ceu --rules naive pcgrad sago \
        --lrs 1e-3 2e-3 4e-3 --out runs/study_objectives    # the other objectives, ~10 minutes

Every run is an ordinary ``lit-unlearn fit`` on the embedded benchmark
(``configs/benchmark/synthetic.yaml``: evaluate every 10 steps, stop at forget Q/A <= 0.2, cap
200 steps), with the synthesis diagnostics on every step. For each objective (by default GradDiff
= gradient ascent + NLL, and NPO + NLL; also WGA, SatImp, UNDIAL, CE-U, IdkDPO, each + NLL) and each rule:

1. learning-rate selection: one run per learning rate of ``--lrs`` on the selection seed
   (``--selection-seed``, not one of the reported seeds); the chosen rate is the one with the
   highest retain accuracy at matched forgetting (a rate that never reaches the target is not
   chosen while another does; if none does, the rate that forgot most);
2. the reported runs: ``--seeds`` at the chosen rate.

Runs go to ``<out>/<objective>/<select|report>/<rule>/lr<lr>_seed<seed>``; a finished run is
never repeated, so an interrupted study continues where it stopped. The runs execute in-process in
``--workers`` worker processes (one thread each), each run's output going to ``<run dir>.log``.

Prints and writes (``<out>/study.json``, ``<out>/study.md``) per objective and rule: the chosen
rate, how many seeds reached the target, the matched step, forget/retain/general accuracy at the
matched point (mean ± std over seeds), the minimum and the mean of cos(u, g_r) over every step of
every seed, and the per-layer pattern: the block × module-type cell where the update opposes
retention most (lowest mean cos(u, g_r)) and the sign-conflict fraction per module type. Also
writes ``compare_runs`` output (``pareto.png``, TensorBoard ``comparison/``) per objective into
``<out>/<objective>/report``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, "configs", "benchmark", "synthetic.yaml")
OBJECTIVES = {  # name -> forget objective component file (the retain objective stays NLL)
    "graddiff": "configs/objective/forget/ga.yaml",
    "npo": "configs/objective/forget/npo.yaml",
    "wga": "configs/objective/forget/wga.yaml",
    "satimp": "configs/objective/forget/satimp.yaml",
    "undial": "configs/objective/forget/undial.yaml",
    "ceu": "configs/objective/forget/ceu.yaml",
    "dpo": "configs/objective/forget/dpo.yaml",
}
DEFAULT_OBJECTIVES = ["graddiff", "npo"]
RULES = [
    "naive",
    "pcgrad",
    "pcgrad_global",
    "sago",
    "sago_prefer_retain",
    "blur",
    "gru",
    "upgrad",
    "mgda",
    "dualproj",
    "imtlg",
    "aligned_mtl",
    "pcd",
]


def run_dir(out: str, objective: str, phase: str, rule: str, lr: float, seed: int) -> str:
    return os.path.join(out, objective, phase, rule, f"lr{lr:g}_seed{seed}")


def fit_args(directory: str, objective: str, rule: str, lr: float, seed: int) -> list[str]:
    """The ``lit-unlearn fit`` arguments of one run writing into ``directory``."""
    save_dir, version = os.path.split(directory)
    return [
        "fit",
        "--config",
        BENCHMARK,
        "--model.forget_objective",
        os.path.join(ROOT, OBJECTIVES[objective]),
        "--model.synthesizer",
        os.path.join(ROOT, "configs", "synthesizer", f"{rule}.yaml"),
        "--model.optimizer.init_args.lr",
        f"{lr:g}",
        "--seed_everything",
        str(seed),
        "--model.diagnostics_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        save_dir,
        "--trainer.logger.init_args.name",
        "",
        "--trainer.logger.init_args.version",
        version,
    ]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def execute(job: tuple[str, list[str]]) -> tuple[str, str | None, float]:
    """Run one ``lit-unlearn fit`` in this worker, its output into ``run.log``: ``(dir, error, s)``."""
    directory, args = job
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    start = time.perf_counter()
    saved = os.dup(1), os.dup(2)
    with open(directory + ".log", "w") as log:  # beside the run: its own directory must start empty
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            from lit_unlearn.cli import main

            main(args)
            error = None
        except BaseException as err:  # noqa: BLE001 - one failed run must not stop the study
            error = f"{type(err).__name__}: {err}"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
    return directory, error, time.perf_counter() - start


def run_all(jobs: list[tuple[str, list[str]]], workers: int) -> None:
    todo = [job for job in jobs if not os.path.exists(os.path.join(job[0], "results.json"))]
    print(f"{len(jobs) - len(todo)} run(s) done already, {len(todo)} to run", flush=True)
    if not todo:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_worker_init, maxtasksperchild=12) as pool:
        for i, (directory, error, seconds) in enumerate(pool.imap_unordered(execute, todo), 1):
            status = f"FAILED ({error}; see {directory}.log)" if error else f"{seconds:.0f} s"
            print(f"  [{i}/{len(todo)}] {os.path.relpath(directory)}: {status}", flush=True)


def load(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def point(results: dict[str, Any]) -> dict[str, Any]:
    """The run at its matched point (or its last evaluation when it never matched)."""
    return results.get("matched") or results.get("final") or {}


def choose_lr(runs: dict[float, dict[str, Any] | None]) -> tuple[float, bool]:
    """The learning rate to report and whether it reached the target on the selection seed."""
    done = {lr: r for lr, r in runs.items() if r is not None}
    if not done:
        raise SystemExit("no selection run finished: see the .log files beside the run directories")
    matched = {lr: r for lr, r in done.items() if r.get("matched")}
    if matched:
        return max(sorted(matched), key=lambda lr: matched[lr]["matched"]["retain_qa"]), True
    return min(sorted(done), key=lambda lr: point(done[lr]).get("forget_qa", math.inf)), False


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One rule's reported seeds: matched count, matched-point means ± std, geometry."""
    points = [point(r) for r in runs]
    out: dict[str, Any] = {
        "seeds": len(runs),
        "matched": sum(1 for r in runs if r.get("matched")),
        "step": _mean_std([float(p["step"]) for p in points if "step" in p]),
    }
    for key in ("forget_qa", "retain_qa", "general_arithmetic"):
        out[key] = _mean_std([p[key] for p in points if key in p])
    geometry = [r.get("geometry") or {} for r in runs]
    mins = [g["min_update_retain_cosine"] for g in geometry if "min_update_retain_cosine" in g]
    means = [g["mean_update_retain_cosine"] for g in geometry if "mean_update_retain_cosine" in g]
    grads = [g["mean_grad_cosine"] for g in geometry if "mean_grad_cosine" in g]
    out["min_cos_u_gr"] = min(mins) if mins else None
    out["mean_cos_u_gr"] = statistics.fmean(means) if means else None
    out["mean_cos_gf_gr"] = statistics.fmean(grads) if grads else None
    out.update(layer_pattern([g.get("per_layer") for g in geometry]))
    return out


def layer_pattern(grids: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Means over seeds of the per-layer geometry: the cell with the lowest cos(u, g_r), and the
    conflict fraction and cos(g_f, g_r) per module type."""
    found = [g for g in grids if g]
    if not found:
        return {}
    layers, types = found[0]["layers"], found[0]["types"]
    cells = {}
    for i, layer in enumerate(layers):
        for j, kind in enumerate(types):
            values = [g["cells"]["update_retain_cosine"][i][j] for g in found]
            if all(v is not None for v in values):
                cells[f"{layer}/{kind}"] = statistics.fmean(values)
    worst = min(cells, key=lambda c: cells[c]) if cells else None
    by_type = {
        key: {kind: statistics.fmean(g["by_type"][key][j] for g in found) for j, kind in enumerate(types)}
        for key in ("conflict_fraction", "grad_cosine", "update_retain_cosine")
    }
    return {
        "weakest_cell": worst,
        "weakest_cell_cos_u_gr": cells.get(worst) if worst else None,
        "by_type": by_type,
    }


def _fmt(pair: Any, digits: int = 3) -> str:
    if pair is None:
        return "—"
    if isinstance(pair, (list, tuple)):
        mean, std = pair
        return "—" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{pair:.{digits}f}"


def tables(study: dict[str, Any]) -> str:
    """The markdown of the study: one main table per objective, then the per-type conflict table."""
    lines: list[str] = []
    for objective, rows in study["objectives"].items():
        lines += [
            f"### {objective}",
            "",
            "| rule | lr | matched | step | forget | retain | general | min cos(u,g_r) | mean cos(u,g_r) | weakest cell (cos(u,g_r)) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows.values():
            s = row["summary"]
            weakest = (
                f"{s['weakest_cell']} ({s['weakest_cell_cos_u_gr']:.2f})" if s.get("weakest_cell") else "—"
            )
            lr = f"{row['lr']:g}" + ("" if row["lr_matched"] else " (none matched)")
            lines.append(
                f"| {row['name']} | {lr} | {s['matched']}/{s['seeds']} | {_fmt(s['step'], 0)} | {_fmt(s['forget_qa'])} "
                f"| {_fmt(s['retain_qa'])} | {_fmt(s['general_arithmetic'])} | {_fmt(s['min_cos_u_gr'])} "
                f"| {_fmt(s['mean_cos_u_gr'])} | {weakest} |"
            )
        lines.append("")
        first = next(iter(rows.values()))["summary"].get("by_type")
        if first:
            types = list(first["conflict_fraction"])
            lines += [
                f"Sign-conflict fraction per module type ({objective}, mean over steps and seeds):",
                "",
                "| rule | " + " | ".join(types) + " |",
                "|---|" + "---|" * len(types),
            ]
            for row in rows.values():
                by_type = row["summary"].get("by_type", {}).get("conflict_fraction", {})
                lines.append(
                    f"| {row['name']} | "
                    + " | ".join(f"{by_type.get(t, math.nan):.3f}" for t in types)
                    + " |"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/study_rules")
    parser.add_argument("--objectives", nargs="+", default=DEFAULT_OBJECTIVES, choices=list(OBJECTIVES))
    parser.add_argument(
        "--rules", nargs="+", default=RULES, help="component files under configs/synthesizer/ (stems)"
    )
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--selection-seed", type=int, default=100)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    for rule in args.rules:
        if not os.path.isfile(os.path.join(ROOT, "configs", "synthesizer", f"{rule}.yaml")):
            parser.error(f"--rules: configs/synthesizer/{rule}.yaml does not exist")
    if args.selection_seed in args.seeds:
        parser.error(
            "--selection-seed must not be one of --seeds: the reported seeds stay out of the lr choice"
        )
    out = os.path.abspath(args.out)
    started = time.perf_counter()

    def selection(objective: str, rule: str, lr: float) -> str:
        return run_dir(out, objective, "select", rule, lr, args.selection_seed)

    jobs = [
        (selection(o, r, lr), fit_args(selection(o, r, lr), o, r, lr, args.selection_seed))
        for o in args.objectives
        for r in args.rules
        for lr in args.lrs
    ]
    print(f"learning-rate selection: {len(jobs)} runs", flush=True)
    run_all(jobs, args.workers)
    chosen = {
        (o, r): choose_lr({lr: load(selection(o, r, lr)) for lr in args.lrs})
        for o in args.objectives
        for r in args.rules
    }
    jobs = []
    for (o, r), (lr, _) in chosen.items():
        for seed in args.seeds:
            directory = run_dir(out, o, "report", r, lr, seed)
            jobs.append((directory, fit_args(directory, o, r, lr, seed)))
    print(f"reported runs: {len(jobs)}", flush=True)
    run_all(jobs, args.workers)

    from lit_unlearn.eval.compare import compare_runs
    from lit_unlearn.logs import rule_name

    study: dict[str, Any] = {"config": vars(args), "objectives": {}}
    for o in args.objectives:
        rows = {}
        for r in args.rules:
            lr, matched = chosen[(o, r)]
            runs = [load(run_dir(out, o, "report", r, lr, seed)) for seed in args.seeds]
            done = [x for x in runs if x is not None]
            if not done:
                continue
            rows[r] = {
                "name": rule_name(done[0]["synthesizer"]),
                "lr": lr,
                "lr_matched": matched,
                "summary": summarise(done),
            }
        study["objectives"][o] = rows
        compare_runs([os.path.join(out, o, "report")], show=False)
    study["minutes"] = round((time.perf_counter() - started) / 60, 1)
    markdown = tables(study)
    print("\n" + markdown)
    with open(os.path.join(out, "study.json"), "w") as handle:
        json.dump(study, handle, indent=2)
    with open(os.path.join(out, "study.md"), "w") as handle:
        handle.write(markdown + "\n")
    print(f"wrote {out}/study.json and study.md ({study['minutes']} min)")
    return study


if __name__ == "__main__":
    main()
