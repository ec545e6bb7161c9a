"""Per-step time and peak memory of every synthesizer in the engine, against two baselines, and
of the sharded (FSDP2) and activation-checkpointed engine.

    python scripts/bench_step.py [--hidden 512 --layers 4 --vocab 8000 --seq 64 --batch 8 --steps 12 --repeats 3]
    python scripts/bench_step.py --device cuda --precision bf16-true --hidden 2048 --layers 16 --vocab 32000  # GPU

Modes run **interleaved** (every mode once, then every mode again, ``--repeats`` times) and the
table shows the median over repeats with the min-max spread: one pass in sequence is
order-sensitive on a shared machine. ``ddp2:``/``fsdp2:`` rows run 2 processes (gloo on CPU) at
the same per-device batch (``fsdp1:`` one process); their memory is rank 0's and "engine buffers"
is per rank (FSDP: 1/N). ``ac:`` (or ``fsdp1+ac:``) adds activation checkpointing. ``diag:`` runs
the synthesis diagnostics on every step and reports what the per-layer geometry adds to such a
step (target: at most 2 %).

Baselines: (a) ``WeightedSum`` in the same engine; (b) plain automatic optimization of the summed
loss ``γ L_f + α L_r`` (one backward). Each configuration runs in its own process so that peak
memory (CUDA allocator peak on GPU, peak RSS on CPU) belongs to it alone. Prints a table and writes
JSON (default ``bench_results/step.json``). Targets: every synthesizer ≤ 1.10× (a) and ≤ 1.20× (b)
in time, and ≤ 1 extra parameter-sized buffer over (b) in peak memory. "extra buffers" is the
measured peak difference to (b) in units of the parameters' size (it can be negative: (b) keeps
both tasks' activations alive for its single backward, the engine frees the forget graph before
the retain forward); "engine buffers" is what the engine allocates beyond ``.grad`` (exactly 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

MODES = [
    "automatic",
    "WeightedSum",
    "PCGrad",
    "PCGradGlobal",
    "SAGO",
    "SAGOPreferRetain",
    "ac:WeightedSum",
    "ac:SAGO",
    "ddp2:WeightedSum",
    "ddp2:SAGO",
    "fsdp2:WeightedSum",
    "fsdp2:PCGrad",
    "fsdp2:SAGO",
    "diag:SAGO",
]


def worker(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from lit_unlearn.benchmarks.synthetic import tiny_llama
    from lit_unlearn.engine.model_setup import ModelSetup
    from lit_unlearn.engine.module import UnlearningModule
    from lit_unlearn.objectives.functional import mean_nll
    from lit_unlearn.synthesis import RULES

    torch.manual_seed(0)
    model = tiny_llama(
        args.vocab,
        hidden=args.hidden,
        intermediate=int(args.hidden * 2.6875),
        layers=args.layers,
        heads=max(1, args.hidden // 64),
        max_positions=args.seq,
    )
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    n_batches = args.steps + args.warmup

    def part():
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    batches = [{"forget": part(), "retain": part()} for _ in range(n_batches)]
    loader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(
        cast(Any, batches), batch_size=None
    )

    class Timer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, module, batch, idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    class Summed(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, idx):
            f, r = batch["forget"], batch["retain"]
            lf = -mean_nll(
                self.model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits, f["labels"]
            )
            lr_ = mean_nll(
                self.model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits, r["labels"]
            )
            return lf + lr_

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.0)

    layout, _, rule_name = args.mode.rpartition(":")
    parts = layout.split("+")
    checkpointing, diagnose = "ac" in parts, "diag" in parts
    layout = next((part for part in parts if part.startswith(("ddp", "fsdp"))), "")
    module: L.LightningModule
    if args.mode == "automatic":
        module = Summed()
    else:
        rule = {cls.__name__: cls for cls in RULES}[rule_name]()
        module = UnlearningModule(
            ModelSetup(cast(Any, model), activation_checkpointing=checkpointing),
            # an already loaded model (the CLI passes a name)
            synthesizer=rule,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5, weight_decay=0.0),
            diagnostics_every_n_steps=1 if diagnose else 0,
        )
    strategy: Any = "auto"
    devices = 1
    if layout.startswith(("ddp", "fsdp")):  # ddp2, fsdp2, fsdp1: strategy and process count
        from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

        devices = int(layout[-1])
        strategy = ModelParallelStrategy(devices, 1) if layout.startswith("fsdp") else DDPStrategy()
    timer = Timer()
    trainer = L.Trainer(
        max_steps=n_batches,
        accelerator=args.device,
        devices=devices,
        strategy=strategy,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[timer],
        log_every_n_steps=10**6,
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, loader)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    param_bytes = n_params * next(iter(model.parameters())).element_size()
    grads = getattr(module, "grads", None)
    engine_extra = grads.extra_bytes() / param_bytes if grads is not None else 0.0
    if trainer.global_rank != 0:
        return {}
    layer_ms = per_layer_extra_ms(model) if diagnose else None
    return {
        "mode": args.mode,
        "layer_geometry_ms": layer_ms,
        "ms": statistics.median(timer.times[args.warmup :]) * 1e3,
        "peak_bytes": peak,
        "params": n_params,
        "param_bytes": param_bytes,
        "engine_buffers": engine_extra,
    }


def per_layer_extra_ms(model: Any, reps: int = 21) -> float:
    """What the per-layer geometry adds to a diagnostics step (ms): the diagnostics of gradients of
    ``model``'s shapes with and without the layer grid (per-cell sums, the longer collective
    payload, the host-side cells), timed in pairs; the median of the paired differences."""
    import torch

    from lit_unlearn.synthesis import GeometryAccumulator, LayerGrid, layer_geometry

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grid = LayerGrid.from_names([n for n, _ in named])
    gen = torch.Generator(device=named[0][1].device).manual_seed(2)
    tensors = [
        [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for _, p in named]
        for _ in range(3)
    ]

    def diagnose(with_grid: bool) -> float:
        start = time.perf_counter()
        acc = GeometryAccumulator(None, grid if with_grid else None)
        for j, (f, r, u) in enumerate(zip(*tensors)):
            acc(j, f, r, u)
        values = acc.result()
        float(values["grad_cosine"])  # the engine reads the totals on a diagnostics step
        if with_grid and acc.layer_sums is not None:
            layer_geometry(acc.layer_sums, grid)
        return time.perf_counter() - start

    diagnose(True)
    differences = [diagnose(True) - diagnose(False) for _ in range(reps)]
    return statistics.median(differences) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes over all modes")
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", type=Path, default=Path("bench_results/step.json"))
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        result = worker(args)
        if result:
            print("RESULT " + json.dumps(result))
        return {}
    samples: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--mode", mode] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("mode", "out", "modes", "repeats")
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
            )
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            samples[mode].append(json.loads(line[0][7:]))
            print(f"  pass {repeat + 1}/{args.repeats} {mode}: {samples[mode][-1]['ms']:.1f} ms", flush=True)
    rows = []
    for runs in samples.values():
        times = [r["ms"] for r in runs]
        row = dict(runs[0])
        row.update(ms=statistics.median(times), ms_min=min(times), ms_max=max(times))
        row["peak_bytes"] = statistics.median(r["peak_bytes"] for r in runs)
        rows.append(row)
    by_mode = {row["mode"]: row for row in rows}
    auto = by_mode.get("automatic", rows[0])
    for row in rows:
        layout = row["mode"].rpartition(":")[0]
        # within the layout; a layout without its own WeightedSum row (diag:) against the plain one
        reference = by_mode.get(f"{layout}:WeightedSum", by_mode.get("WeightedSum", row))
        row["x_weighted_sum"] = round(row["ms"] / reference["ms"], 3)  # within the same layout
        row["x_automatic"] = round(row["ms"] / auto["ms"], 3)
        row["extra_buffers_vs_automatic"] = round(
            (row["peak_bytes"] - auto["peak_bytes"]) / auto["param_bytes"], 2
        )
    result = {
        "device": args.device,
        "precision": args.precision,
        "params": auto["params"],
        "config": vars(args) | {"out": str(args.out)},
        "rows": rows,
    }
    print(
        f"{auto['params'] / 1e6:.1f} M parameters, {args.device}, {args.precision}, batch {args.batch}+{args.batch} x {args.seq} tokens"
    )
    print(f"median of {args.repeats} interleaved passes (min-max); x WeightedSum is within the same layout")
    header = (
        f"{'mode':<20}{'ms/step':>10}{'spread':>16}{'x WeightedSum':>15}{'x automatic':>13}{'peak MB':>10}"
        f"{'extra buffers':>15}{'engine buffers':>16}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        spread = f"{row['ms_min']:.0f}-{row['ms_max']:.0f}"
        print(
            f"{row['mode']:<20}{row['ms']:>10.1f}{spread:>16}{row['x_weighted_sum']:>15.3f}{row['x_automatic']:>13.3f}"
            f"{row['peak_bytes'] / 2**20:>10.0f}{row['extra_buffers_vs_automatic']:>15.2f}{row['engine_buffers']:>16.2f}"
        )
    for row in rows:
        if row.get("layer_geometry_ms") is not None:
            row["layer_geometry_ms"] = statistics.median(r["layer_geometry_ms"] for r in samples[row["mode"]])
            row["layer_geometry_share"] = round(row["layer_geometry_ms"] / row["ms"], 4)
            print(
                f"{row['mode']}: per-layer geometry adds {row['layer_geometry_ms']:.2f} ms to a "
                f"{row['ms']:.0f} ms diagnostics step ({100 * row['layer_geometry_share']:.2f} %; target <= 2 %)"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
