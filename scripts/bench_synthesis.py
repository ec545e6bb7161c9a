"""Benchmark every synthesizer on a transformer-shaped parameter list.

Prints a table and writes JSON (default ``bench_results/synthesis.json``):

    python scripts/bench_synthesis.py [--layers 12 --hidden 512 --reps 5 --out PATH]
    python scripts/bench_synthesis.py --device cuda       # on a GPU (times synchronise the device)

For each rule, through the engine's own call ``rule(F, R, out=U)``, compiled (the default) and
eager (``LIT_UNLEARN_COMPILE=0``): median milliseconds, effective GB/s (two gradients read, one
update written), the ratio to a memory-bandwidth floor (``torch.add(a, b, out=c)`` over the same
tensors, interleaved with the rule's own repetitions so both see the same machine load), the
compile time (the compiled path's first call), and the speed-up over a straightforward reference
implementation written below with boolean-mask indexing and one ``.item()`` per tensor.

A one-pass rule (sum, SAGO, SAGO-prefer-retain) cannot beat the floor; a rule with sums over
coordinates reads both gradients once more (PCGrad, PCGrad-global, BLUR, the TorchJD bridge:
about 5/3 of the floor); GRU also reads and writes its moving average (about 7/3).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lit_unlearn.synthesis import GRU, RULES, Synthesizer, TorchJD
from lit_unlearn.synthesis.compiled import ENV

EPS = 1e-10


def transformer_shapes(layers: int, hidden: int, ffn: int, vocab: int) -> list[tuple[int, ...]]:
    """Embedding, per-layer q/k/v/o/gate/up/down and two norms, final norm, untied LM head."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


# --- straightforward references: mask indexing and a per-tensor .item() -------------------------
def ref_weighted(f, r, a, g):
    return [a * ri + g * fi for fi, ri in zip(f, r)]


def ref_pcgrad(f, r, a, g):
    out = []
    for fi, ri in zip(f, r):
        dot = (fi * ri).sum().item()
        if dot < 0:
            fi = fi - dot / (ri.norm().item() ** 2 + EPS) * ri
        out.append(a * ri + g * fi)
    return out


def ref_pcgrad_global(f, r, a, g):
    dot = sum((fi * ri).sum().item() for fi, ri in zip(f, r))
    sq = sum((ri * ri).sum().item() for ri in r)
    c = dot / (sq + EPS) if dot < 0 else 0.0
    return [a * ri + g * (fi - c * ri) for fi, ri in zip(f, r)]


def ref_sago(f, r, a, g):
    out = []
    for fi, ri in zip(f, r):
        u = g * fi
        mask = fi * ri < 0
        u[mask] = a * ri[mask]
        out.append(u)
    return out


def ref_sago_prefer_retain(f, r, a, g):
    out = []
    for fi, ri in zip(f, r):
        u = a * ri + g * fi
        mask = fi * ri < 0
        u[mask] = a * ri[mask]
        out.append(u)
    return out


def ref_blur(f, r, a, g):
    dot = sum((fi * ri).sum().item() for fi, ri in zip(f, r))
    sq = sum((fi * fi).sum().item() for fi in f)
    c = dot / (sq + EPS)
    return [g * fi + a * (ri - c * fi) for fi, ri in zip(f, r)]


def ref_gru(f, r, a, g, ema=0.8):
    """First step from the zero average: ``r̄ = ema · g_r``."""
    avg = [ema * ri for ri in r]
    dot = sum((fi * ai).sum().item() for fi, ai in zip(f, avg))
    sq = sum((ai * ai).sum().item() for ai in avg)
    c = dot / (sq + EPS) if dot < 0 else 0.0
    return [g * (fi - c * ai) for fi, ai in zip(f, avg)]


REFERENCES: dict[str, Callable] = {
    "WeightedSum": ref_weighted,
    "PCGrad": ref_pcgrad,
    "PCGradGlobal": ref_pcgrad_global,
    "SAGO": ref_sago,
    "SAGOPreferRetain": ref_sago_prefer_retain,
    "BLUR": ref_blur,
    "GRU": ref_gru,
}


def naive_where_sago(f, r, a, g):
    return [torch.where(fi * ri < 0, a * ri, g * fi) for fi, ri in zip(f, r)]


SYNC: list[Callable[[], None]] = [lambda: None]  # torch.cuda.synchronize on a GPU


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    SYNC[0]()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        SYNC[0]()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def timed_against_floor(
    fn: Callable[[], object], floor: Callable[[], object], reps: int
) -> tuple[float, float]:
    """Interleave rule and floor runs so both see the same machine load; return both medians (ms)."""
    fn()
    floor()
    SYNC[0]()
    rule_t, floor_t = [], []
    for _ in range(reps):
        start = time.perf_counter()
        floor()
        SYNC[0]()
        mid = time.perf_counter()
        fn()
        SYNC[0]()
        floor_t.append(mid - start)
        rule_t.append(time.perf_counter() - mid)
    return statistics.median(rule_t) * 1e3, statistics.median(floor_t) * 1e3


def rule_factories(g: float, a: float) -> list[tuple[str, Callable[[], Synthesizer]]]:
    """Every exported rule, and the TorchJD bridge (UPGrad) when torchjd is installed."""
    made: list[tuple[str, Callable[[], Synthesizer]]] = []
    for cls in RULES:
        kwargs = {"forget_weight": g} if cls is GRU else {"forget_weight": g, "retain_weight": a}
        made.append((cls.__name__, functools.partial(cls, **kwargs)))
    try:
        from torchjd.aggregation import UPGrad
    except ImportError:
        return made
    made.append(("TorchJD-UPGrad", lambda: TorchJD(UPGrad(), forget_weight=g, retain_weight=a)))
    return made


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--forget-weight", type=float, default=1.0)
    parser.add_argument("--retain-weight", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("bench_results/synthesis.json"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        SYNC[0] = torch.cuda.synchronize

    gen = torch.Generator().manual_seed(0)
    shapes = transformer_shapes(args.layers, args.hidden, args.ffn, args.vocab)
    forget = [torch.randn(s, generator=gen).to(args.device) for s in shapes]
    retain = [torch.randn(s, generator=gen).to(args.device) for s in shapes]
    out = [torch.empty_like(r) for r in retain]
    numel = sum(t.numel() for t in forget)
    gbytes = 3 * numel * 4 / 1e9
    a, g = args.retain_weight, args.forget_weight

    def floor() -> None:
        for fi, ri, oi in zip(forget, retain, out):
            torch.add(fi, ri, out=oi)

    rows = []
    floor_all = []
    for name, make in rule_factories(g, a):
        row: dict = {"rule": name, "granularity": make().granularity}
        for mode, flag in (("compiled", "1"), ("eager", "0")):
            os.environ[ENV] = flag
            rule = make()
            start = time.perf_counter()
            rule(forget, retain, out=out)  # compiles on the compiled path
            first = time.perf_counter() - start
            ms, floor_ms = timed_against_floor(
                functools.partial(rule, forget, retain, out=out), floor, args.reps
            )
            floor_all.append(floor_ms)
            row[mode] = {
                "ms": round(ms, 2),
                "gb_per_s": round(gbytes / (ms / 1e3), 2),
                "floor_ms": round(floor_ms, 2),
                "x_floor": round(ms / floor_ms, 2),
                "compiled": rule.compiled_passes() is not None,
                "compile_s": round(rule.compile_seconds, 1),
                "first_call_s": round(first, 2),
            }
            if mode == "compiled" and name in REFERENCES:
                check = REFERENCES[name](forget, retain, a, g)
                row["max_abs_diff_vs_reference"] = max(
                    (u - c).abs().max().item() for u, c in zip(make()(forget, retain), check)
                )
        if name in REFERENCES:
            reference = functools.partial(REFERENCES[name], forget, retain, a, g)
            row["reference_ms"] = round(timed(reference, max(2, args.reps // 2)), 2)
            row["speedup_vs_reference"] = round(row["reference_ms"] / row["compiled"]["ms"], 2)
        rows.append(row)
    os.environ.pop(ENV, None)
    where_ms, where_floor = timed_against_floor(lambda: naive_where_sago(forget, retain, a, g), floor, 3)
    floor_ms = statistics.median(floor_all)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tensors": len(shapes),
        "elements": numel,
        "floor_ms": round(floor_ms, 2),
        "floor_gb_per_s": round(gbytes / (floor_ms / 1e3), 2),
        "naive_where_sago_x_floor": round(where_ms / where_floor, 2),
        "rules": rows,
    }
    print(
        f"{len(shapes)} tensors, {numel / 1e6:.1f} M fp32 elements, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"floor (torch.add out=): {floor_ms:.1f} ms, {result['floor_gb_per_s']} GB/s;"
        f" naive torch.where SAGO: {result['naive_where_sago_x_floor']}x floor"
    )
    header = (
        f"{'rule':<18}{'gran.':<8}{'ms':>8}{'x floor':>9}{'compile s':>11}"
        f"{'eager ms':>10}{'x floor':>9}{'ref ms':>9}{'speed-up':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        c, e = row["compiled"], row["eager"]
        speed = f"{row['speedup_vs_reference']:>9.1f}x" if "reference_ms" in row else f"{'-':>10}"
        ref = f"{row['reference_ms']:>9.1f}" if "reference_ms" in row else f"{'-':>9}"
        print(
            f"{row['rule']:<18}{row['granularity']:<8}{c['ms']:>8.1f}{c['x_floor']:>9.2f}{c['compile_s']:>11.1f}"
            f"{e['ms']:>10.1f}{e['x_floor']:>9.2f}{ref}{speed}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
