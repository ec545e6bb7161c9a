"""Every check of a flag or a setting the engine depends on, in one place (the CLI runs the same
ones on the parsed config, before anything loads)."""

from __future__ import annotations

from typing import Any

from lit_unlearn.errors import UserError

UNSUPPORTED_PRECISIONS = ("16-mixed", "16")


def check_precision(precision: Any) -> None:
    """Refuse fp16 mixed precision: its loss scaling would distort the synthesized update."""
    if str(precision) in UNSUPPORTED_PRECISIONS:
        raise UserError(
            f"--trainer.precision {precision} is not supported (loss scaling would distort the synthesized "
            "update, and on CPU Lightning would silently run bf16-mixed instead); use bf16-mixed, bf16-true or 32-true"
        )


def check_learning_rate(lr: Any, flag: str = "--model.optimizer.init_args.lr") -> None:
    """A learning rate must be a number > 0."""
    if isinstance(lr, (int, float)) and not lr > 0:
        raise UserError(f"{flag} must be > 0, got {lr}")


def module_flags(
    accumulate_grad_batches: int,
    warmup_ratio: float,
    lr_decay: str,
    gradient_clip_val: float | None,
    lr_scheduler: Any,
) -> None:
    """The optimisation flags of ``UnlearningModule``."""
    if accumulate_grad_batches < 1:
        raise UserError(f"--model.accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise UserError(f"--model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if gradient_clip_val is not None and not gradient_clip_val > 0:
        raise UserError(f"--model.gradient_clip_val must be > 0, got {gradient_clip_val}")
    if lr_scheduler is not None and (warmup_ratio != 0.0 or lr_decay != "constant"):
        raise UserError(
            "--model.warmup_ratio / --model.lr_decay shape the built-in schedule and would be ignored next to "
            "--model.lr_scheduler; set one or the other"
        )


def check_supported(trainer: Any) -> None:
    """Refuse strategies and precisions the engine does not handle, with the flag to change."""
    strategy = type(trainer.strategy).__name__
    if any(name in strategy for name in ("FSDP", "DeepSpeed")):
        raise UserError(
            f"--trainer.strategy: {strategy} is not supported; for sharded training use ModelParallelStrategy "
            "(FSDP2, e.g. --config configs/trainer/cpu_fsdp.yaml or gpu_fsdp.yaml), otherwise ddp or one device"
        )
    check_precision(trainer.precision)
    if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
        raise UserError(
            "set --trainer.use_distributed_sampler false: UnlearningDataModule shards batches by rank itself"
        )


def check_alternates(objective: Any, datamodule: Any) -> None:
    """An objective that contrasts the forget answer with an alternate needs alternates in the data."""
    if not getattr(objective, "needs_alternates", False) or datamodule is None:
        return
    if getattr(datamodule, "has_alternates", True):
        return
    sources = ", ".join(s.describe() for s in getattr(datamodule, "forget_sources", []))
    raise UserError(
        f"--model.forget_objective {type(objective).__name__} needs an alternate answer for every forget example, "
        f"and the forget data ({sources}) has none: set --data.forget.init_args.alternates_file to a file of "
        "refusals (e.g. configs/data/idk_refusals.txt) or give each record an 'alternate' field"
    )


def batch_layout(trainer: Any, accumulate_grad_batches: int) -> dict[str, int]:
    """Sequences per device and task, processes and micro-batches: what fixes the data order."""
    dm = getattr(trainer, "datamodule", None)
    return {
        "world_size": trainer.world_size,
        "accumulate_grad_batches": accumulate_grad_batches,
        **{f"{t}_per_device": int(getattr(dm, f"{t}_batch_size", 0) or 0) for t in ("forget", "retain")},
    }


def check_batch_layout(saved: dict[str, int] | None, now: dict[str, int]) -> None:
    """A resumed run must keep the checkpoint's batch layout (else the data order and steps change)."""
    if saved is None or saved == now:
        return

    def said(d: dict[str, int]) -> str:
        return (
            f"{d['forget_per_device']}+{d['retain_per_device']} sequences per device x {d['world_size']} "
            f"process(es) x {d['accumulate_grad_batches']} micro-batch(es)"
        )

    raise UserError(
        f"--ckpt_path: the checkpoint was trained with {said(saved)}, this run uses {said(now)}; "
        "resume with the same --data.*_batch_size, --trainer.devices/num_nodes and --model.accumulate_grad_batches "
        "(a different layout would change the data order and the optimizer steps)"
    )
