"""The README's memory table, from ``lit-unlearn-plan``'s own estimate (regenerate it with this).

    python scripts/plan_table.py            # prints the Markdown table

8 GPUs of 80 GiB, ``bf16-true`` weights, fp32 forget buffer, AdamW, 4 sequences x 512 tokens per
device; the two paper models from their offline configurations in ``configs/model/shapes/``.
"""

from __future__ import annotations

import os
from typing import Literal

from lit_unlearn.tools.plan import GIB, model_shape, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = (("Zephyr-7B-beta", "zephyr-7b-beta"), ("Llama-3-8B-Instruct", "llama-3-8b-instruct"))
SETTINGS: tuple[tuple[str, Literal["ddp", "fsdp"], bool, bool], ...] = (
    # (label, strategy, activation checkpointing, reference model)
    ("DDP", "ddp", False, False),
    ("FSDP", "fsdp", False, False),
    ("FSDP + activation checkpointing", "fsdp", True, True),
)
GPU_GIB = 80.0


def table() -> str:
    """The Markdown table (header included)."""
    lines = [
        "| model | strategy | reference model (NPO/KL/RMU) | state | activations | total | fits 80 GiB at batch 4 | largest batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for title, folder in MODELS:
        shape = model_shape(os.path.join(ROOT, "configs", "model", "shapes", folder))
        for i, (label, strategy, checkpointing, reference) in enumerate(SETTINGS):
            p = plan(
                shape, strategy, devices=8, batch=4, seq_len=512,
                activation_checkpointing=checkpointing, reference=reference, gpu_gib=GPU_GIB,
            )  # fmt: skip
            name = f"{title} ({shape.parameters / 1e9:.2f} B)" if i == 0 else title
            state = (p.total - p.activations) / GIB
            fits = "yes" if p.total / GIB <= GPU_GIB else "no"
            lines.append(
                f"| {name} | {label} | {'yes' if reference else 'no'} | {state:.2f} | {p.activations / GIB:.2f} "
                f"| {p.total / GIB:.2f} | {fits} | {p.max_batch or 'none'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
