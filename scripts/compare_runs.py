"""Compare unlearning runs: retention at matched forgetting per synthesizer x objective, plus a Pareto plot.

    python scripts/compare_runs.py runs/demo/naive runs/demo/pcgrad runs/demo/sago --out runs/demo/pareto.png
    python scripts/compare_runs.py runs/sweep            # every run below a folder

Reads each run's ``results.json`` (written by ``TradeoffReport``), prints a table (and, when a
setting has several runs, e.g. seeds, their mean ± std) and saves the plot.
"""

from __future__ import annotations

import argparse
import json

from lit_unlearn.eval.report import compare_runs, summarize_seeds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run directories (or folders containing runs)")
    parser.add_argument("--out", default="pareto.png", help="where to save the Pareto plot (PNG)")
    parser.add_argument(
        "--general-metric",
        default=None,
        help="key shown in the 'general' column (default: the first general_* metric)",
    )
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    rows = compare_runs(args.runs, out_png=args.out, general_metric=args.general_metric)
    if len(rows) > len({(r["synthesizer"], r["objective"]) for r in rows}):  # several seeds per setting
        print("\nmean ± std over the runs of each synthesizer x objective:")
        summarize_seeds(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
