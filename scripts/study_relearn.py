"""Relearning attack on the embedded benchmark: naive vs PCGrad vs SAGO at matched forgetting,
against an attacker tuned on validation people and reported on test people.

    python scripts/study_relearn.py [--out runs/study_relearn] [--seeds 0 1 2 3 4] [--steps 30]

The 20 forget people are split three ways (``SyntheticKnowledge`` / ``SyntheticProbes`` subsets):
10 whose documents the attacker fine-tunes on (``relearn``), 5 it may watch to tune itself
(``held_out_validation``) and 5 it never sees, where recovery is reported (``held_out_test``).

1. For each synthesizer and seed, ``lit-unlearn fit --config configs/benchmark/synthetic.yaml``
   unlearns all 20 forget people and stops at matched forgetting *of the held-out people*:
   Q/A accuracy on the 10 held-out people <= 0.2, checked every 2 steps. Every rule therefore
   starts the attack from (nearly) the same held-out accuracy.
2. ``lit-unlearn-relearn`` attacks each unlearned model with AdamW at every learning rate of
   ``--lrs`` for ``--steps`` steps, evaluating every 5; the attacker keeps the learning rate and
   the number of steps that maximise Q/A accuracy on the validation people, and the table reports
   the test people at that point.
3. The same tuned attack on the retrain oracle (never saw the forget people) and on the target
   (never unlearned) bounds the table from below and above.

Reported per rule (mean ± std over seeds): unlearning steps, retain Q/A at the match, held-out
test Q/A before and after the attack and the recovery (after − before); then, for each pair of
rules, the mean paired difference (same seed) in recovery and in retain Q/A with a 95 % bootstrap
interval over seeds. Everything lands in ``<out>/study.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from itertools import combinations

from lit_unlearn.benchmarks.synthetic.target import target_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BENCHMARK = "configs/benchmark/synthetic.yaml"
DATA = "{class_path: lit_unlearn.benchmarks.synthetic.SyntheticKnowledge, init_args: {part: forget, subset: relearn}}"
PROBES = (
    "[{class_path: lit_unlearn.eval.SyntheticProbes, init_args: {forget_subset: held_out_validation, "
    "forget_name: validation}}, {class_path: lit_unlearn.eval.SyntheticProbes, init_args: "
    "{forget_subset: held_out_test, forget_name: test}}]"
)
MATCH_ON_HELD_OUT = """# written by scripts/study_relearn.py: matched forgetting on the held-out forget people
trainer:
  callbacks:
    - class_path: lit_unlearn.eval.UnlearningEvaluator
      init_args:
        metrics:
          - class_path: lit_unlearn.eval.SyntheticProbes
            init_args: {forget_subset: held_out, forget_name: held_out}
        every_n_steps: 2
        monitor: held_out_qa
        target: 0.2
    - class_path: lit_unlearn.eval.TradeoffReport
      init_args: {forget_metric: held_out_qa, retain_metric: retain_qa}
"""
ORACLE = target_dir("oracle")  # both in the machine's cache (LIT_UNLEARN_CACHE)
TARGET = target_dir("default")


def run(cmd: list[str], env: dict[str, str]) -> None:
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def attack(model: str, out: str, steps: int, lrs: list[float], env: dict[str, str]) -> dict:
    """The tuned attack's results.json (reused when it exists)."""
    if not os.path.exists(os.path.join(ROOT, out, "results.json")):
        cmd = [
            os.path.join(BIN, "lit-unlearn-relearn"),
            "--model",
            model,
            "--data",
            DATA,
            "--metrics",
            PROBES,
        ]
        cmd += ["--steps", str(steps), "--eval_every", "5", "--lrs", json.dumps(lrs)]
        run([*cmd, "--select_on", "validation_qa", "--out", out], env)
    with open(os.path.join(ROOT, out, "results.json")) as handle:
        return json.load(handle)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_bootstrap(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired seeds with a 95 % percentile bootstrap interval (seeds resampled)."""
    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return {
        "mean": statistics.fmean(diffs),
        "low": means[int(0.025 * resamples)],
        "high": means[int(0.975 * resamples) - 1],
        "positive_seeds": sum(d > 0 for d in diffs),
        "n": len(diffs),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/study_relearn", help="runs and study.json (reruns reuse finished runs)"
    )
    parser.add_argument("--synthesizers", nargs="+", default=["naive", "pcgrad", "sago"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=30, help="longest attack (a multiple of 5)")
    parser.add_argument(
        "--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3], help="the attacker's grid"
    )
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONWARNINGS": "ignore",
    }
    start = time.perf_counter()
    os.makedirs(os.path.join(ROOT, args.out), exist_ok=True)
    overlay = os.path.join(args.out, "match_on_held_out.yaml")
    with open(os.path.join(ROOT, overlay), "w") as handle:
        handle.write(MATCH_ON_HELD_OUT)
    run([os.path.join(BIN, "lit-unlearn-target")], env)
    if not os.path.exists(os.path.join(ORACLE, "config.json")):
        run([os.path.join(BIN, "lit-unlearn-target"), "--oracle", "true"], env)

    rows: dict[str, list[dict]] = {}
    for synth in args.synthesizers:
        for seed in args.seeds:
            unlearned = os.path.join(args.out, synth, f"seed{seed}")
            if not os.path.exists(os.path.join(ROOT, unlearned, "unlearned_model")):
                cmd = [os.path.join(BIN, "lit-unlearn"), "fit", "--config", BENCHMARK, "--config", overlay]
                cmd += [
                    "--seed_everything",
                    str(seed),
                    "--model.synthesizer",
                    f"configs/synthesizer/{synth}.yaml",
                ]
                cmd += [
                    "--trainer.logger.init_args.save_dir",
                    unlearned,
                    "--trainer.logger.init_args.name",
                    "",
                ]
                run([*cmd, "--trainer.logger.init_args.version", ""], env)
            with open(os.path.join(ROOT, unlearned, "results.json")) as handle:
                fit = json.load(handle)
            point = fit["matched"] or fit["final"]
            report = attack(
                os.path.join(unlearned, "unlearned_model"),
                os.path.join(unlearned, "attack"),
                args.steps,
                args.lrs,
                env,
            )
            before = report["curves"][f"{report['selected']['lr']:g}"][0]
            rows.setdefault(synth, []).append(
                {
                    "seed": seed,
                    "matched": fit["matched"] is not None,
                    "unlearning_steps": point["step"],
                    "held_out_forget_qa_at_match": point["held_out_qa"],
                    "retain_qa": point["retain_qa"],
                    "test_before": before["test_qa"],
                    "test_after": report["selected"]["point"]["test_qa"],
                    "recovery": report["recovery"]["test_qa"],
                    "attack_lr": report["selected"]["lr"],
                    "attack_steps": report["selected"]["step"],
                }
            )
    bounds = {}
    for name, model in (("retrain oracle", ORACLE), ("target (no unlearning)", TARGET)):
        report = attack(model, os.path.join(args.out, name.split()[0]), args.steps, args.lrs, env)
        before = report["curves"][f"{report['selected']['lr']:g}"][0]
        bounds[name] = {
            "test_before": before["test_qa"],
            "test_after": report["selected"]["point"]["test_qa"],
            "recovery": report["recovery"]["test_qa"],
            "retain_qa": before["retain_qa"],
            "attack_lr": report["selected"]["lr"],
            "attack_steps": report["selected"]["step"],
        }

    columns = [
        ("unlearning_steps", "steps", 0), ("held_out_forget_qa_at_match", "held-out@match", 3), ("retain_qa", "retain Q/A", 3),
        ("test_before", "test before", 3), ("test_after", "test after", 3), ("recovery", "recovery", 3),
    ]  # fmt: skip
    header = (
        f"{'model':<24}{'seeds':>6}{'matched':>8}"
        + "".join(f"{label:>17}" for _, label, _ in columns)
        + "   attack (lr, steps)"
    )
    lines = [header, "-" * len(header)]
    table = []
    for synth, runs in rows.items():
        cells = {key: mean_sd([r[key] for r in runs]) for key, _, _ in columns}
        attacks = ", ".join(f"{r['attack_lr']:g}/{r['attack_steps']}" for r in runs)
        lines.append(
            f"{synth:<24}{len(runs):>6}{sum(r['matched'] for r in runs):>8}"
            + "".join(f"{f'{cells[k][0]:.{d}f} ± {cells[k][1]:.{d}f}':>17}" for k, _, d in columns)
            + f"   {attacks}"
        )
        table.append({"model": synth, "runs": runs, "mean_sd": cells})
    for name, b in bounds.items():
        lines.append(
            f"{name:<24}{1:>6}{'-':>8}{'-':>17}{'-':>17}{b['retain_qa']:>17.3f}{b['test_before']:>17.3f}"
            f"{b['test_after']:>17.3f}{b['recovery']:>17.3f}   {b['attack_lr']:g}/{b['attack_steps']}"
        )
    lines += [
        "",
        "paired differences over seeds (mean, 95 % bootstrap interval, seeds where the first is higher):",
    ]
    pairs = {}
    for first, second in combinations(list(rows), 2):
        for key in ("recovery", "retain_qa"):
            stats = paired_bootstrap(
                [r[key] for r in sorted(rows[second], key=lambda r: r["seed"])],
                [r[key] for r in sorted(rows[first], key=lambda r: r["seed"])],
            )
            pairs[f"{second} - {first}: {key}"] = stats
            lines.append(
                f"  {second} - {first}: {key:<10} {stats['mean']:+.3f}  [{stats['low']:+.3f}, {stats['high']:+.3f}]"
                f"  {stats['positive_seeds']}/{stats['n']}"
            )
    print("\n" + "\n".join(lines))
    with open(os.path.join(ROOT, args.out, "study.json"), "w") as handle:
        json.dump(
            {"table": table, "bounds": bounds, "paired": pairs, "printed": lines, "args": vars(args)},
            handle,
            indent=2,
        )
    print(f"\n{os.path.join(args.out, 'study.json')}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
