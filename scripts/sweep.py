"""Sweep synthesizers x learning rates x seeds on any benchmark, by composing config blocks.

    python scripts/sweep.py --benchmark configs/benchmark/synthetic.yaml \
        --synthesizers naive pcgrad sago --lrs 5e-4 1e-3 2e-3 --seeds 0 1 2 --out runs/sweep
    python scripts/sweep.py --benchmark configs/benchmark/wmdp_bio.yaml \
        --config configs/experiments/wmdp_bio/npo_sago.yaml --synthesizers naive sago --lrs 1e-5 \
        --out runs/npo -- --config configs/trainer/gpu_ddp.yaml
    python scripts/compare_runs.py runs/sweep

Each run is one ordinary ``lit-unlearn fit``: the benchmark file, any ``--config`` overlays, then
``--model.synthesizer configs/synthesizer/<name>.yaml`` (or a path), the learning rate and the
seed, then whatever follows ``--``. Runs go to ``<out>/<synthesizer>/lr<lr>_seed<seed>``. Running
the same sweep again skips finished runs and continues interrupted ones from their
``last.ckpt``; ``--dry-run`` only prints the commands (e.g. to submit them to a cluster).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def component(value: str, folder: str) -> str:
    """A component given by stem (``sago``) or by path."""
    return value if value.endswith(".yaml") else os.path.join("configs", folder, f"{value}.yaml")


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(run directory, command)`` for every synthesizer x lr x seed."""
    out = []
    for synth in args.synthesizers:
        for lr in args.lrs:
            for seed in args.seeds:
                stem = os.path.basename(synth)[: -len(".yaml")] if synth.endswith(".yaml") else synth
                version = f"{stem}/lr{lr:g}_seed{seed}"
                cmd = [
                    os.path.join(BIN, "lit-unlearn"),
                    "fit",
                    "--config",
                    component(args.benchmark, "benchmark"),
                ]
                for overlay in args.config:
                    cmd += ["--config", overlay]
                cmd += ["--model.synthesizer", component(synth, "synthesizer")]
                cmd += ["--model.optimizer.init_args.lr", f"{lr:g}", "--seed_everything", str(seed)]
                cmd += [
                    "--trainer.logger.init_args.save_dir",
                    args.out,
                    "--trainer.logger.init_args.name",
                    "",
                ]
                cmd += ["--trainer.logger.init_args.version", version]
                out.append((os.path.join(args.out, version), cmd + list(args.extra)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--benchmark", default="synthetic", help="configs/benchmark/<name>.yaml, by stem or path"
    )
    parser.add_argument(
        "--config", action="append", default=[], help="overlays after the benchmark (repeatable)"
    )
    parser.add_argument("--synthesizers", nargs="+", default=["naive", "pcgrad", "sago"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="extra lit-unlearn flags after --")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    for path in [component(args.benchmark, "benchmark"), *args.config] + [
        component(s, "synthesizer") for s in args.synthesizers
    ]:
        if not os.path.isfile(os.path.join(ROOT, path)) and not os.path.isfile(path):
            parser.error(f"{path}: no such config file")
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
    print(f"compare: python scripts/compare_runs.py {args.out}")


if __name__ == "__main__":
    main()
