"""Compare unlearning runs: which method keeps more at matched forgetting?

    python scripts/compare_runs.py runs/demo                  # every run below a folder
    python scripts/compare_runs.py runs/a runs/b --out runs/ab
    python scripts/compare_runs.py runs/demo --oracle ~/.cache/lit_unlearn/synthetic-oracle/metrics.json

Prints every run (with its seed) and each method's mean ± std over distinct seeds at matched
forgetting, and writes into the folder (or --out): pareto.png, comparison.json and the TensorBoard
run comparison/ (tensorboard --logdir <folder>: Images -> tradeoff/*, Text -> tradeoff/*).
"""

from __future__ import annotations

import argparse
import json
import sys

try:
    from lit_unlearn.eval.compare import compare_runs
except ModuleNotFoundError as missing:  # run with a Python that lacks the project
    sys.exit(
        f"compare_runs.py: {missing.name} is not installed in this Python ({sys.executable}); "
        "run `source .venv/bin/activate` first (`make venv` creates it), or `make compare`"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run directories or folders containing runs")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: the folder given, or the common parent of the folders given)",
    )
    parser.add_argument(
        "--general-metric",
        default=None,
        help="key shown in the 'general' column (default: each run's first general_* metric)",
    )
    parser.add_argument(
        "--oracle",
        default=None,
        help="metrics.json of a retrain oracle (lit-unlearn-target --oracle true writes one), drawn as a reference",
    )
    args = parser.parse_args(argv)
    oracle = None
    if args.oracle:
        try:
            with open(args.oracle, encoding="utf-8") as handle:
                oracle = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"--oracle {args.oracle}: expected a JSON file of metrics ({err})")
    try:
        compare_runs(args.runs, out_dir=args.out, general_metric=args.general_metric, oracle=oracle)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"compare_runs.py: {err}\n")


if __name__ == "__main__":
    main()
