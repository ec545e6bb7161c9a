"""Data at scale: tokenize once into the memory-mapped cache, then start every rank from it.

    python scripts/bench_data.py [--mb 100 300] [--out bench_results/data.json]

For each size, generates a JSONL corpus of about ``--mb`` MB (documents of words from the synthetic benchmark's
vocabulary, so the offline word-level tokenizer applies), then measures, each phase in a fresh
process so that memory numbers belong to it alone:

- ``build``: ``prepare_data`` on an empty cache (what one process per node does once): wall time,
  tokenization throughput (tokens/s and MB/s of text), the PEAK resident-memory growth while
  building (``VmHWM``, reset after the imports) and the growth after it;
- ``cache hit``: a later launch's ``setup`` (what every rank does): wall time and resident-memory
  growth after ``setup`` and after reading every example once (the pages are file-backed and
  shared between ranks through the page cache);
- ``in memory`` (``cache_dir: null``, the behaviour before the cache): ``setup`` on every rank,
  every launch: wall time and resident-memory growth (on corpora up to 100 MB only).

Memory growth is measured after the libraries are imported and the tokenizer loaded once, so it
is what the data adds.

Targets: peak growth of the building process <= 400 MB for a 100 MB corpus, not growing with the
corpus (the build streams); resident growth per rank after ``setup`` on a cache hit <= 100 MB;
cache-hit start-up <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory now (``VmRSS``) or its peak since the last :func:`reset_peak` (``VmHWM``)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start the peak (``VmHWM``, what ``ru_maxrss`` reports) afresh at the current resident size,
    so the imports' own peak does not hide the data's (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def phase(name: str, corpus: str, tokenizer: str, cache: str | None) -> dict:
    import datasets  # noqa: F401  (libraries imported before the baseline: the growth is the data's)
    import transformers  # noqa: F401

    from lit_unlearn.data import TextCorpus, UnlearningDataModule
    from lit_unlearn.models import load_tokenizer

    load_tokenizer(tokenizer)
    reset_peak()
    before = rss_mb()
    start = time.perf_counter()
    dm = UnlearningDataModule(
        tokenizer,
        TextCorpus(corpus),
        TextCorpus(corpus),
        max_length=512,
        forget_batch_size=4,
        cache_dir=cache,
    )
    if name == "build":
        dm.prepare_data()
        seconds = time.perf_counter() - start
        peak = rss_mb("VmHWM")  # the building process's peak: the streamed build's bound
        dm.setup("fit")
    else:
        dm.setup("fit")
        seconds = time.perf_counter() - start
        peak = rss_mb("VmHWM")
    after_setup = rss_mb()
    tokens = sum(int(example["input_ids"].numel()) for example in dm.forget_examples)  # reads every example
    return {
        "phase": name,
        "seconds": round(seconds, 2),
        "examples": len(dm.forget_examples),
        "tokens": tokens,
        "peak_rss_growth_mb": round(peak - before, 1),
        "rss_growth_after_setup_mb": round(after_setup - before, 1),
        "rss_growth_after_reading_mb": round(rss_mb() - before, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, nargs="+", default=[100.0, 300.0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/data.json"))
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print("RESULT " + json.dumps(phase(args.phase, args.corpus, args.tokenizer, args.cache or None)))
        return {}

    from lit_unlearn.benchmarks.synthetic.corpus import build_tokenizer, generate_corpus

    work = tempfile.mkdtemp(prefix="bench_data-")
    corpus = generate_corpus(200)
    tokenizer_dir = os.path.join(work, "tokenizer")
    build_tokenizer(corpus).save_pretrained(tokenizer_dir)
    words = [w for w in corpus.vocabulary() if w.isalpha()]
    results = [measure(mb, work, tokenizer_dir, words) for mb in args.mb]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"corpora": results}, indent=2))
    print(f"wrote {args.out}")
    return {"corpora": results}


def measure(mb: float, work: str, tokenizer_dir: str, words: list[str]) -> dict:
    """Write a corpus of ``mb`` MB and run the phases on it, each in a fresh process."""
    rng = random.Random(0)
    path = os.path.join(work, f"corpus-{mb:g}.jsonl")
    size = 0
    with open(path, "w") as handle:
        while size < mb * 1e6:
            line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 400)))}) + "\n"
            handle.write(line)
            size += len(line)
    cache = os.path.join(work, f"cache-{mb:g}")
    phases = [("build", cache), ("cache hit", cache)]
    if mb <= 100:  # the in-memory path needs ~25x the text in RAM: measured on the small corpus only
        phases.append(("in memory", ""))
    rows = []
    for name, cache_dir in phases:
        cmd = [sys.executable, __file__, "--phase", name, "--corpus", path, "--tokenizer", tokenizer_dir]
        cmd += ["--cache", cache_dir]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
        printed = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not printed:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(printed[0][7:])
        row["process_seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
    os.remove(path)
    build = rows[0]
    result = {
        "corpus_mb": round(size / 1e6, 1),
        "tokens": build["tokens"],
        "tokens_per_second": round(build["tokens"] / build["seconds"]),
        "text_mb_per_second": round(size / 1e6 / build["seconds"], 2),
        "rows": rows,
    }
    print(
        f"\ncorpus {result['corpus_mb']} MB, {build['tokens'] / 1e6:.1f} M tokens, {build['examples']} chunks of 512; "
        f"tokenization {result['tokens_per_second'] / 1e6:.2f} M tokens/s ({result['text_mb_per_second']} MB/s)"
    )
    header = (
        f"{'phase':<12}{'setup s':>9}{'process s':>11}{'peak RSS +MB':>14}{'RSS +MB setup':>15}"
        f"{'RSS +MB read all':>18}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['phase']:<12}{row['seconds']:>9.2f}{row['process_seconds']:>11.2f}{row['peak_rss_growth_mb']:>14.1f}"
            f"{row['rss_growth_after_setup_mb']:>15.1f}{row['rss_growth_after_reading_mb']:>18.1f}"
        )
    return result


if __name__ == "__main__":
    main()
