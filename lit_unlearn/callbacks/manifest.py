"""A run manifest written next to the resolved config: what ran, where, with which versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import lightning as L
import torch

from lit_unlearn.engine.outcome import components, engine_of, model_of
from lit_unlearn.rundir import run_directory, write_json_atomic

PACKAGES = (
    "lit_unlearn",
    "torch",
    "lightning",
    "transformers",
    "datasets",
    "torchmetrics",
    "lm_eval",
    "jsonargparse",
)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision(cwd: str | None = None) -> str | None:
    """The current commit (with ``-dirty`` when the tree has changes), or ``None`` outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_manifest(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """Library versions, world size, per-device and effective batch sizes, seed, git revision."""
    dm = getattr(trainer, "datamodule", None)
    engine = engine_of(module)
    accumulate = engine.accumulate_grad_batches if engine is not None else 1
    batch: dict[str, Any] = {}
    for task in ("forget", "retain"):
        per_device = getattr(dm, f"{task}_batch_size", None)
        if per_device is not None:
            batch[task] = {
                "per_device": per_device,
                "effective": per_device * accumulate * trainer.world_size,
            }
    return {
        "versions": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
        "accumulate_grad_batches": accumulate,
        "batch_size": batch,
        "seed": getattr(dm, "seed", None),
        "seed_everything": os.environ.get("PL_GLOBAL_SEED"),
        "git_revision": git_revision(),
        **components(module),
    }


class RunManifest(L.Callback):
    """Writes ``manifest.json`` into the run directory at fit start (rank 0 writes; every rank
    resolves the directory, which is a collective under DDP). A resumed run that writes into
    the same directory keeps the first manifest as ``manifest.json`` and adds ``manifest-resume-N.json``."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = run_directory(trainer)
        if not trainer.is_global_zero:
            return
        path, n = os.path.join(run_dir, "manifest.json"), 1
        while os.path.exists(path):
            path, n = os.path.join(run_dir, f"manifest-resume-{n}.json"), n + 1
        manifest = run_manifest(trainer, pl_module)
        manifest["resumed_from"] = trainer.ckpt_path
        write_json_atomic(path, manifest)
        print(f"lit-unlearn: {parameter_line(pl_module)}", flush=True)


def parameter_line(module: Any) -> str:
    """One line instead of Lightning's model summary table: the network's class and how many of
    its parameters train (under FSDP2, this rank's shards count at their global size)."""
    model: Any = model_of(module)
    total = sum(int(p.numel()) for p in model.parameters())
    trained = sum(int(p.numel()) for p in model.parameters() if p.requires_grad)
    cls = type(model)
    if cls.__name__.startswith("FSDP"):  # FSDP2 wraps the class: FSDP<Name>(FSDPModule, <Name>)
        cls = cls.__bases__[-1]
    return f"model {cls.__name__}: {_count(total)} parameters, {_count(trained)} trained"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
