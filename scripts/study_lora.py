"""LoRA vs full fine-tuning on the embedded benchmark, for naive, PCGrad and SAGO synthesis.

    python scripts/study_lora.py [--out runs/study_lora] [--ranks 0 4 8 16] [--seeds 0 1 2]

Every run is an ordinary ``lit-unlearn fit --config configs/benchmark/synthetic.yaml`` (GradDiff,
AdamW, evaluation every 10 steps, stop at matched forgetting: forget Q/A <= 0.2, 200 steps at most)
with ``--model.synthesizer configs/synthesizer/<rule>.yaml``; rank 0 means full fine-tuning at the
benchmark's lr 1e-3, rank r adds ``--config configs/adapter/lora.yaml --model.network.adapter.rank r
--model.network.adapter.alpha 2r`` (so the adapter scale alpha/r stays 2) and runs each of ``--lora_lrs``.
For every (rank, rule) the table reports, for the lr whose seeds all reached the target with the
best mean retain accuracy (or, if none did, the lr with the most matched seeds), the mean ± std over
the finished seeds of
the step, forget, retain and general accuracy at matched forgetting, the mean cosine between the
update and the retain gradient, and the mean fraction of conflicting coordinates (forget and retain
gradients of opposite sign). A run that stops with an error (the collapse guard: the retain loss
near that of a uniform prediction) counts as not matched and is listed in ``<out>/study.json``
with everything else.
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
COLUMNS = ("step", "forget", "retain", "general", "cos_u_gr", "conflict")


def fit(out: str, rule: str, seed: int, rank: int, lr: float | None, env: dict[str, str]) -> str | None:
    """One run; its directory, or ``None`` when it stopped with an error (e.g. collapse), which is
    then recorded in ``<out>/failed.txt`` and counted as not matched."""
    cmd = [os.path.join(BIN, "lit-unlearn"), "fit", "--config", BENCHMARK]
    cmd += ["--model.synthesizer", f"configs/synthesizer/{rule}.yaml", "--seed_everything", str(seed)]
    if rank:
        cmd += ["--config", "configs/adapter/lora.yaml", "--model.network.adapter.rank", str(rank)]
        cmd += ["--model.network.adapter.alpha", str(2 * rank)]
    if lr is not None:
        cmd += ["--model.optimizer.init_args.lr", str(lr)]
    cmd += ["--trainer.logger.init_args.save_dir", out, "--trainer.logger.init_args.name", ""]
    cmd += ["--trainer.logger.init_args.version", "", "--export.enabled", "false"]
    failed = os.path.join(ROOT, out, "failed.txt")
    if os.path.exists(os.path.join(ROOT, out, "results.json")) or os.path.exists(failed):
        print(f"(done) {out}", flush=True)
        return None if os.path.exists(failed) else out
    print(f"$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"  failed (exit {proc.returncode}): {reason}", flush=True)
        with open(failed, "w") as handle:
            handle.write(reason + "\n")
        return None
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> dict:
    entry: dict = {"n": len(rows), "matched": sum(bool(r["matched"]) for r in rows)}
    for col in COLUMNS:
        values = [r[col] for r in rows if r.get(col) is not None]
        if values:
            entry[col] = mean_std(values)
    return entry


def choose(by_lr: dict[float, dict]) -> tuple[float, dict]:
    """The lr whose seeds all matched with the best mean retain; else the one closest to the target."""
    complete = {lr: s for lr, s in by_lr.items() if s["matched"] == s["n"]}
    if complete:
        return max(complete.items(), key=lambda item: item[1]["retain"][0])
    ran = {lr: s for lr, s in by_lr.items() if "forget" in s} or by_lr
    return max(ran.items(), key=lambda item: (item[1]["matched"], -item[1].get("forget", (1.0, 0.0))[0]))


def fmt(pair: tuple[float, float] | None, digits: int = 3) -> str:
    return "—" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/study_lora", help="runs and study.json go here (reruns skip finished runs)"
    )
    parser.add_argument(
        "--ranks", nargs="+", type=int, default=[0, 4, 8, 16], help="LoRA ranks; 0 = full fine-tuning"
    )
    parser.add_argument(
        "--lora_lrs", nargs="+", type=float, default=[3e-3, 1e-2], help="AdamW lrs tried for LoRA"
    )
    parser.add_argument("--synthesizers", nargs="+", default=["naive", "pcgrad", "sago"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONWARNINGS": "ignore",
    }
    start = time.perf_counter()
    subprocess.run([os.path.join(BIN, "lit-unlearn-target")], cwd=ROOT, env=env, check=True)
    from lit_unlearn.eval.compare import compare_runs

    study: dict = {"settings": {}, "table": []}
    for rank in args.ranks:
        for rule in args.synthesizers:
            by_lr: dict[float, dict] = {}
            for lr in args.lora_lrs if rank else [None]:
                tag = f"r{rank}/lr{lr:g}" if rank else "full"
                runs = [
                    fit(os.path.join(args.out, tag, rule, f"seed{s}"), rule, s, rank, lr, env)
                    for s in args.seeds
                ]
                done = [os.path.join(ROOT, d) for d in runs if d is not None]
                rows = compare_runs(done, write=False)["runs"] if done else []
                summary = summarize(rows)
                summary["n"], summary["failed"] = len(runs), runs.count(None)
                by_lr[lr if lr is not None else 1e-3] = summary
                study["settings"][f"{tag}/{rule}"] = {"runs": rows, "summary": summary}
            lr, best = choose(by_lr)
            study["table"].append({"rank": rank, "synthesizer": rule, "lr": lr, **best})
    header = (
        f"{'training':<10}{'synthesizer':<12}{'lr':>7}{'matched':>9}{'step':>12}{'forget':>16}"
        f"{'retain':>16}{'general':>16}{'cos(u,g_r)':>14}{'conflict':>14}"
    )
    lines = [header]
    for row in study["table"]:
        name = f"LoRA r{row['rank']}" if row["rank"] else "full"
        lines.append(
            f"{name:<10}{row['synthesizer']:<12}{row['lr']:>7.0e}{row['matched']:>6}/{row['n']:<2}"
            f"{fmt(row.get('step'), 0):>12}{fmt(row.get('forget')):>16}{fmt(row.get('retain')):>16}"
            f"{fmt(row.get('general')):>16}{fmt(row.get('cos_u_gr'), 2):>14}{fmt(row.get('conflict'), 2):>14}"
        )
    print("\n" + "\n".join(lines))
    study["printed"] = lines
    with open(os.path.join(ROOT, args.out, "study.json"), "w") as handle:
        json.dump(study, handle, indent=2)
    print(f"\n{os.path.join(args.out, 'study.json')}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
