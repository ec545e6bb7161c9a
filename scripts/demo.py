"""The main job on the embedded default: unlearn the synthetic target with three synthesizers.

    make demo            # sets up .venv first, then runs this
    python scripts/demo.py [--out runs/demo] [--synthesizers naive pcgrad sago]

Steps, each an ordinary command you can copy:
1. ``lit-unlearn-target`` builds (first time, ~1 minute) or reuses the cached target: a tiny Llama
   that knows 200 fictitious people;
2. for each synthesizer and each of 3 seeds (the seed fixes the data order), ``lit-unlearn fit``
   with GradDiff at lr 1e-3, evaluating every 10 steps and stopping when forget Q/A accuracy <= 0.2
   (cap 200 steps): the matched-forgetting protocol;
3. with ``--oracle``, ``lit-unlearn-target --oracle true`` builds the retrain oracle as a reference;
4. ``scripts/compare_runs.py`` prints every run and the mean ± std per synthesizer, and writes
   ``pareto.png``, ``comparison.json`` and the TensorBoard run ``comparison/`` into the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

try:
    from lit_unlearn.rundir import write_json_atomic
except ModuleNotFoundError as missing:  # run with a Python that lacks the project
    sys.exit(
        f"demo.py: {missing.name} is not installed in this Python ({sys.executable}); "
        "run `make demo` (it creates .venv), or `source .venv/bin/activate` first"
    )

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BENCHMARK = (
    "configs/benchmark/synthetic.yaml"  # target, data, probes, matched-forgetting stop, GradDiff lr 1e-3
)


def run(cmd: list[str], env: dict[str, str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def free_directory(out: str) -> str:
    """``out`` if it is missing or empty, else the first free ``out-2``, ``out-3``, ..."""
    candidate, n = out, 1
    while os.path.isdir(os.path.join(ROOT, candidate)) and os.listdir(os.path.join(ROOT, candidate)):
        n += 1
        candidate = f"{out.rstrip('/')}-{n}"
    return candidate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default="runs/demo",
        help="where the runs, TensorBoard logs and plot go (if it already "
        "holds runs, the next free runs/demo-2, -3, ... is used: earlier runs are never overwritten)",
    )
    parser.add_argument(
        "--synthesizers",
        nargs="+",
        default=["naive", "pcgrad", "sago"],
        help="component files under configs/synthesizer/ (by stem)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="one run per seed and synthesizer (the seed fixes the data order); the table shows mean ± std",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also build the retrain oracle (never saw the forget people; ~1 minute) and print it "
        "as the reference: forget accuracy near its value is 'forgotten', below it over-forgetting",
    )
    args = parser.parse_args(argv)
    args.out = free_directory(args.out)
    # One thread is 3-5x faster than two for this 160k-parameter model on a shared 2-core CPU.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONWARNINGS": "ignore",
    }
    start = time.perf_counter()
    run([os.path.join(BIN, "lit-unlearn-target")], env)
    run_dirs = []
    for synth in args.synthesizers:
        for seed in args.seeds:
            out = os.path.join(args.out, synth, f"seed{seed}")
            cmd = [os.path.join(BIN, "lit-unlearn"), "fit", "--config", BENCHMARK]
            cmd += [
                "--model.synthesizer",
                f"configs/synthesizer/{synth}.yaml",
                "--seed_everything",
                str(seed),
            ]
            cmd += ["--trainer.logger.init_args.save_dir", out, "--trainer.logger.init_args.name", ""]
            cmd += ["--trainer.logger.init_args.version", ""]
            run(cmd, env)
            run_dirs.append(out)
    oracle = None
    if args.oracle:
        from lit_unlearn.benchmarks.synthetic.target import target_dir

        oracle_dir = target_dir("oracle")  # in the machine's cache
        run([os.path.join(BIN, "lit-unlearn-target"), "--oracle", "true"], env)
        with open(os.path.join(oracle_dir, "metrics.json")) as handle:
            oracle = json.load(handle)
    compare = ["python", "scripts/compare_runs.py", args.out]
    if args.oracle:
        compare += ["--oracle", os.path.join(oracle_dir, "metrics.json")]
    print(f"\n$ {shlex.join(compare)}\n", flush=True)
    from lit_unlearn.eval.compare import compare_runs

    comparison = compare_runs([os.path.join(ROOT, args.out)], oracle=oracle)
    if oracle is not None:
        print(
            f"\nretrain oracle (reference): forget {oracle['forget_qa']:.3f}  retain {oracle['retain_qa']:.3f}  "
            f"general {oracle['general_arithmetic']:.3f}"
        )
    write_json_atomic(os.path.join(ROOT, args.out, "summary.json"), comparison)
    venv = os.path.dirname(BIN)
    active = bool(os.environ.get("VIRTUAL_ENV")) and os.path.samefile(os.environ["VIRTUAL_ENV"], venv)
    runs = "" if args.out == "runs/demo" else f" RUNS={args.out}"
    print("\nnext:")
    if not active:
        print(
            f"  source {os.path.relpath(venv, ROOT)}/bin/activate   # puts lit-unlearn and tensorboard on PATH"
        )
    print(
        f"  tensorboard --logdir {args.out}   # or: make tensorboard{runs}  (the run 'comparison': Images, Text)"
    )
    print(f"  python scripts/compare_runs.py {args.out}   # or: make compare{runs}")
    print(f"total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
