"""``lit-unlearn-plan``: how much memory a run needs per device, before renting the GPUs.

From a model's configuration alone (a hub id or a local folder / ``config.json``; no weights are
read: the model is built on the ``meta`` device to count its parameters), the strategy, device
count, precision, buffer dtype, batch, sequence length and activation checkpointing, it prints the
bytes per device of each part of a two-task unlearning step and the largest per-device batch that
fits a given GPU::

    lit-unlearn-plan --model HuggingFaceH4/zephyr-7b-beta --strategy fsdp --devices 8
    lit-unlearn-plan --model path/to/config.json --strategy ddp --devices 8 --gpu_gib 80 --batch 4

What it counts (``P`` parameters, ``N`` devices, sharded parts divided by ``N`` under FSDP):
weights; ``.grad`` (the retain gradient and, after synthesis, the update); the forget buffer (and a
retain buffer when an fp32 buffer accumulates bf16 gradients over several micro-batches); AdamW's
two moments; a frozen reference model for NPO/KL/RMU; under FSDP the unsharded parameters and
gradients of the layer in flight (and the next one, prefetched); and activations: the tensors a
Llama-style decoder layer keeps for backward, per token (about ``6h + 2h_kv + 4i`` values, plus the
attention matrix for the eager kernel), times layers, plus the logits and their log-softmax at the
end, and the loss's backward temporaries. With activation checkpointing only each layer's input
is kept, plus one layer recomputed. The two tasks' activations never coexist: the forget graph is
freed before the retain forward. A test checks the estimate against PyTorch's own memory tracker
on small random models (within 15 %).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lit_unlearn.errors import UserError, function_cli

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
PRECISIONS = {  # precision -> (weight and gradient dtype, compute dtype)
    "32-true": ("float32", "float32"),
    "bf16-true": ("bfloat16", "bfloat16"),
    "bf16-mixed": ("float32", "bfloat16"),
    "16-true": ("float16", "float16"),
}


@dataclass
class ModelShape:
    """What the estimate needs to know about a decoder-only model."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    largest_layer: int  # parameters of the biggest decoder layer (FSDP gathers one at a time)


def model_shape(model: str, trust_remote_code: bool = False) -> ModelShape:
    """Count parameters without weights: build the model from its configuration on ``meta``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_unlearn.models import decoder_layers

    path = os.path.dirname(model) if model.endswith(".json") else model
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"--model: cannot read a model configuration from {model!r} ({err})") from None
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layers = decoder_layers(net)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return ModelShape(
        parameters=sum(p.numel() for p in net.parameters()),
        layers=len(layers),
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", 4 * hidden),
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab=config.vocab_size,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
    )


def activation_bytes(
    shape: ModelShape, tokens: int, seq_len: int, checkpointing: bool, eager: bool, compute_bytes: int
) -> float:
    """Peak bytes of one forward + backward over ``tokens`` tokens beyond weights and gradients.

    Kept for backward per token: each decoder layer ``6h + 2h_kv + 4i`` values (norm inputs, the
    q/k/v input, attention output, the MLP's gate, up, activation and product; plus ``heads x
    seq_len`` attention probabilities for the eager kernel), the logits and the final norm's input.
    The loss's backward then holds two fp32 logits-sized temporaries. With checkpointing only each
    layer's input is kept; the peak is then either at the loss (inputs + logits + temporaries) or
    while one layer is recomputed, whichever is larger.
    """
    per_layer = 6 * shape.hidden + 2 * shape.kv_heads * (shape.hidden // shape.heads) + 4 * shape.intermediate
    if eager:
        per_layer += shape.heads * seq_len
    head = (shape.vocab + shape.hidden) * compute_bytes + 2 * shape.vocab * 4
    if checkpointing:
        inputs = shape.layers * shape.hidden * compute_bytes
        return tokens * (inputs + max(head, per_layer * compute_bytes))
    return tokens * (shape.layers * per_layer * compute_bytes + head)


@dataclass
class Plan:
    """Bytes per device, by part, and the largest per-device batch that fits."""

    parameters: int
    weights: float
    gradients: float
    task_buffers: float
    optimizer: float
    reference: float
    gathered_layers: float
    activations: float
    total: float
    max_batch: int | None


def plan(
    shape: ModelShape,
    strategy: Literal["ddp", "fsdp"] = "ddp",
    devices: int = 1,
    precision: str = "bf16-true",
    buffer_dtype: Literal["float32", "param"] = "float32",
    batch: int = 4,
    seq_len: int = 512,
    accumulate: int = 1,
    activation_checkpointing: bool = False,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    reference: bool = False,
    eager_attention: bool = False,
    gpu_gib: float | None = 80.0,
) -> Plan:
    """The per-device estimate (see the module docstring for what is counted)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    param_dtype, compute_dtype = PRECISIONS[precision]
    pb, cb = BYTES[param_dtype], BYTES[compute_dtype]
    share = devices if strategy == "fsdp" else 1
    p = shape.parameters / share
    bb = pb if buffer_dtype == "param" else 4
    buffers = p * bb + (p * bb if bb != pb and accumulate > 1 else 0)
    gathered = 2 * 2 * shape.largest_layer * pb if strategy == "fsdp" else 0.0  # params + grads, 2 layers
    fixed = {
        "weights": p * pb,
        "gradients": p * pb,
        "task_buffers": buffers,
        "optimizer": p * pb * (2 if optimizer == "adamw" else 0),
        "reference": p * pb if reference else 0.0,
        "gathered_layers": gathered,
    }

    def activations(b: int) -> float:
        return activation_bytes(shape, b * seq_len, seq_len, activation_checkpointing, eager_attention, cb)

    total = sum(fixed.values()) + activations(batch)
    max_batch = None
    if gpu_gib is not None:
        free = gpu_gib * GIB - sum(fixed.values())
        per_sequence = activations(1)
        max_batch = max(0, math.floor(free / per_sequence)) if free > 0 else 0
    return Plan(shape.parameters, activations=activations(batch), total=total, max_batch=max_batch, **fixed)


def format_plan(result: Plan, title: str) -> str:
    """A small table in GiB."""
    rows = [(k, v) for k, v in asdict(result).items() if k not in ("parameters", "max_batch")]
    lines = [f"{title}: {result.parameters / 1e9:.2f} B parameters"]
    lines += [f"  {name:<16}{value / GIB:>9.2f} GiB" for name, value in rows]
    if result.max_batch is not None:
        lines.append(f"  {'max batch':<16}{result.max_batch:>9d} sequences per device")
    return "\n".join(lines)


def main_plan(
    model: str,
    strategy: Literal["ddp", "fsdp"] = "fsdp",
    devices: int = 8,
    precision: str = "bf16-true",
    buffer_dtype: Literal["float32", "param"] = "float32",
    batch: int = 4,
    seq_len: int = 512,
    accumulate: int = 1,
    activation_checkpointing: bool = False,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    reference: bool = False,
    gpu_gib: float = 80.0,
    json_out: str | None = None,
    trust_remote_code: bool = False,
) -> Plan:
    """Estimate per-device memory of an unlearning run and the largest batch that fits.

    Args:
        model: hub id, local model folder or ``config.json`` (no weights are read).
        strategy: ``ddp`` (everything replicated) or ``fsdp`` (sharded over ``devices``).
        devices: GPUs in the run.
        precision: ``bf16-true``, ``bf16-mixed``, ``32-true`` or ``16-true``.
        buffer_dtype: the forget buffer's dtype (``--model.grad_buffer_dtype``).
        batch: sequences per device per task (``--data.*_batch_size``).
        seq_len: tokens per sequence (``--data.max_length``).
        accumulate: micro-batches per optimizer step (``--model.accumulate_grad_batches``).
        activation_checkpointing: ``--model.activation_checkpointing``.
        optimizer: ``adamw`` (two moments) or ``sgd`` (none).
        reference: a frozen reference model is kept (NPO, KL, RMU).
        gpu_gib: memory of one GPU, for the largest batch that fits.
        json_out: also write the numbers to this JSON file.
        trust_remote_code: allow custom modelling code from the hub (off by default).
    """
    shape = model_shape(model, trust_remote_code)
    result = plan(
        shape, strategy, devices, precision, buffer_dtype, batch, seq_len, accumulate,
        activation_checkpointing, optimizer, reference, gpu_gib=gpu_gib,
    )  # fmt: skip
    print(format_plan(result, f"{model} · {strategy} × {devices} · {precision} · batch {batch} × {seq_len}"))
    if json_out:
        with open(json_out, "w") as handle:
            json.dump({"model": model, "shape": asdict(shape), **asdict(result)}, handle, indent=2)
    return result


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lit-unlearn-plan``."""
    function_cli("lit-unlearn-plan", main_plan, args)


def as_dict(result: Plan) -> dict[str, Any]:
    return asdict(result)
