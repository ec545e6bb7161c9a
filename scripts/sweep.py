"""Learning-rate x synthesizer sweep; the output folder feeds scripts/compare_runs.py.

Rerunning the same sweep skips finished runs and continues interrupted ones from their last.ckpt.

    python scripts/sweep.py --benchmark synthetic --objective graddiff \
        --lrs 5e-4 1e-3 2e-3 --synthesizers naive pcgrad sago --out runs/sweep
    python scripts/compare_runs.py runs/sweep --out runs/sweep/pareto.png

Each run is one ordinary ``lit-unlearn fit`` on the shipped experiment config with
``--model.optimizer.init_args.lr`` overridden; ``--dry-run`` only prints the commands (e.g. to
submit them to a cluster). Runs whose results.json exists are skipped, so a sweep can be resumed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from make_experiment_configs import STACKS

BIN = os.path.dirname(sys.executable)


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    out = []
    for synth in args.synthesizers:
        for lr in args.lrs:
            run_dir = os.path.join(args.out, f"{args.objective}_{synth}_lr{lr:g}")
            cmd = [os.path.join(BIN, "lit-unlearn"), "fit"]
            for cfg in STACKS[args.benchmark].split(" --config "):
                cmd += ["--config", cfg]
            cmd += [
                "--config",
                f"configs/experiments/{args.benchmark}/{args.objective}_{synth}.yaml",
                "--model.optimizer.init_args.lr",
                f"{lr:g}",
                "--trainer.default_root_dir",
                run_dir,
                "--trainer.logger.class_path",
                "lightning.pytorch.loggers.TensorBoardLogger",
                "--trainer.logger.init_args.save_dir",
                run_dir,
                "--trainer.logger.init_args.name",
                "",
                "--trainer.logger.init_args.version",
                "",
            ]
            out.append((run_dir, cmd + list(args.extra)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", default="synthetic", choices=sorted(STACKS))
    parser.add_argument("--objective", default="graddiff", choices=["ga", "graddiff", "npo", "simnpo", "rmu"])
    parser.add_argument("--synthesizers", nargs="+", default=["naive", "pcgrad", "sago"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="extra lit-unlearn flags after --")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for run_dir, cmd in commands(args):
        if os.path.exists(os.path.join(run_dir, "results.json")):
            print(f"# done already: {run_dir}")
            continue
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        if os.path.exists(last):  # an interrupted run: continue it
            cmd = [*cmd, "--ckpt_path", last]
        print("$ " + shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True, env=env)
    print(f"compare: python scripts/compare_runs.py {args.out} --out {args.out}/pareto.png")


if __name__ == "__main__":
    main()
