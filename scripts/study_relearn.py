"""Relearning attack on the embedded benchmark: naive vs PCGrad vs SAGO at matched forgetting.

    python scripts/study_relearn.py [--out runs/study_relearn] [--seeds 0 1 2] [--steps 30]

1. For each synthesizer and seed, ``lit-unlearn fit --config configs/benchmark/synthetic.yaml``
   unlearns all 20 forget people and stops at matched forgetting (forget Q/A <= 0.2).
2. ``lit-unlearn-relearn`` fine-tunes that model (AdamW, lr 1e-3, batch 8) on the documents of the
   first half of the forget people and probes the *other half* every 5 steps: the knowledge the
   attack never showed the model.
3. The same attack on the retrain oracle (never saw the forget people; built once if missing) and
   on the target (never unlearned) bounds the table from below and above.

The table is the held-out forget Q/A accuracy before the attack and after 10 and ``--steps``
steps (mean ± std over seeds); everything lands in ``<out>/study.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BENCHMARK = "configs/benchmark/synthetic.yaml"
DATA = "{class_path: lit_unlearn.data.SyntheticKnowledge, init_args: {part: forget, subset: relearn}}"
PROBES = "[{class_path: lit_unlearn.eval.SyntheticProbes, init_args: {forget_subset: held_out}}]"
ORACLE = ".cache/lit_unlearn/synthetic-oracle"
TARGET = ".cache/lit_unlearn/synthetic-target"


def run(cmd: list[str], env: dict[str, str]) -> None:
    print(f"$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def attack(model: str, out: str, steps: int, env: dict[str, str]) -> list[dict]:
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
        run([*cmd, "--steps", str(steps), "--eval_every", "5", "--out", out], env)
    with open(os.path.join(ROOT, out, "results.json")) as handle:
        return json.load(handle)["curve"]


def at(curve: list[dict], step: int) -> float:
    return next(h["forget_qa"] for h in curve if h["step"] == step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/study_relearn", help="runs and study.json (reruns reuse finished runs)"
    )
    parser.add_argument("--synthesizers", nargs="+", default=["naive", "pcgrad", "sago"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="attack length (a multiple of 5)")
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONWARNINGS": "ignore",
    }
    start = time.perf_counter()
    run([os.path.join(BIN, "lit-unlearn-target")], env)
    if not os.path.exists(os.path.join(ROOT, ORACLE, "config.json")):
        run([os.path.join(BIN, "lit-unlearn-target"), "--oracle", "true", "--output_dir", ORACLE], env)
    marks = [0, 10, args.steps]
    curves: dict[str, list[list[dict]]] = {}
    for synth in args.synthesizers:
        for seed in args.seeds:
            unlearned = os.path.join(args.out, synth, f"seed{seed}")
            if not os.path.exists(os.path.join(ROOT, unlearned, "unlearned_model")):
                cmd = [
                    os.path.join(BIN, "lit-unlearn"),
                    "fit",
                    "--config",
                    BENCHMARK,
                    "--seed_everything",
                    str(seed),
                ]
                cmd += ["--model.synthesizer", f"configs/synthesizer/{synth}.yaml"]
                cmd += [
                    "--trainer.logger.init_args.save_dir",
                    unlearned,
                    "--trainer.logger.init_args.name",
                    "",
                ]
                run([*cmd, "--trainer.logger.init_args.version", ""], env)
            model = os.path.join(unlearned, "unlearned_model")
            curves.setdefault(synth, []).append(
                attack(model, os.path.join(unlearned, "attack"), args.steps, env)
            )
    for name, model in (("retrain oracle", ORACLE), ("target (no unlearning)", TARGET)):
        curves[name] = [attack(model, os.path.join(args.out, name.split()[0]), args.steps, env)]
    lines = [f"{'model':<24}{'runs':>5}" + "".join(f"{f'held-out forget Q/A @ {m}':>28}" for m in marks)]
    table = []
    for name, runs in curves.items():
        cells = []
        for m in marks:
            values = [at(c, m) for c in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append((statistics.fmean(values), sd))
        table.append(
            {"model": name, "runs": len(runs), "held_out_forget_qa": dict(zip(map(str, marks), cells))}
        )
        lines.append(f"{name:<24}{len(runs):>5}" + "".join(f"{f'{m:.3f} ± {s:.3f}':>28}" for m, s in cells))
    print("\n" + "\n".join(lines))
    with open(os.path.join(ROOT, args.out, "study.json"), "w") as handle:
        json.dump({"table": table, "printed": lines, "curves": curves}, handle, indent=2)
    print(f"\n{os.path.join(args.out, 'study.json')}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
