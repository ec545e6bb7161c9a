"""``lit-unlearn-plan``: how much memory a run needs per device, before renting the GPUs.

From a model's configuration alone (a hub id or a local folder / ``config.json``; no weights are
read: the model is built on the ``meta`` device to count its parameters), the strategy, device
count, precision, buffer dtype, batch, sequence length and activation checkpointing, it prints the
bytes per device of each part of a two-task unlearning step and the largest per-device batch that
fits a given GPU::

    lit-unlearn-plan --model HuggingFaceH4/zephyr-7b-beta --strategy fsdp --devices 8
    lit-unlearn-plan --model path/to/config.json --strategy ddp --devices 8 --gpu_gib 80 --batch 4

Given the configuration files of a run (``--config``, as for ``lit-unlearn fit``), it takes the
settings from them — the model, devices, strategy, precision, batch, sequence length,
accumulation, activation checkpointing, optimizer, adapter, and whether an objective needs the
frozen reference model — and the flags given after them override them::

    lit-unlearn-plan --config configs/benchmark/wmdp_bio.yaml --config configs/experiments/wmdp_bio/npo_sago.yaml \
        --config configs/trainer/gpu_fsdp.yaml --model configs/model/shapes/zephyr-7b-beta

What it counts (``P`` parameters, ``N`` devices, sharded parts divided by ``N`` under FSDP):
weights; ``.grad`` (the retain gradient and, after synthesis, the update); the forget buffer (and a
retain buffer when an fp32 buffer accumulates bf16 gradients over several micro-batches); AdamW's
two moments; a frozen reference model for NPO/KL/RMU; under FSDP the unsharded parameters and
gradients of the layer in flight (and the next one, prefetched); and activations: the tensors a
Llama-style decoder layer keeps for backward, per token (about ``6h + 2h_kv + 4i`` values, plus the
attention matrix for the eager kernel), times layers, plus the logits and their log-softmax at the
end, and the loss's backward temporaries. With activation checkpointing only each layer's input
is kept, plus one layer recomputed. With ``--lora_rank`` (a LoRA run) the base weights are frozen
and only the adapters train: gradients, task buffers and AdamW moments are
adapter-sized, there is no reference copy (the reference is the base with its adapters off), and
each adapted layer adds its rank-r intermediate (and a float32 copy of its input for bf16 models) to
the activations. The two tasks' activations never coexist: the forget graph is
freed before the retain forward. A test checks the estimate against PyTorch's own memory tracker
on small random models (within 15 %).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lit_unlearn.adapters import LLAMA_LINEAR
from lit_unlearn.errors import UserError, function_cli, run_reporting_errors

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
    # decoder-layer linear layers by name: (sum of in_features, sum of out_features) over the layers
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)

    def adapter_parameters(self, rank: int, targets: list[str]) -> int:
        """Parameters of rank-``rank`` LoRA adapters on the decoder layers' linear layers named
        ``targets`` (``A`` is ``rank x in``, ``B`` is ``out x rank``)."""
        missing = [t for t in targets if t not in self.linears]
        if missing:
            raise UserError(
                f"--lora_targets: {missing} are not linear layers of this model (it has {sorted(self.linears)})"
            )
        return rank * sum(sum(self.linears[t]) for t in targets)


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
    linears: dict[str, tuple[int, int]] = {}
    for layer in layers:
        for name, sub in layer.named_modules():
            if isinstance(sub, torch.nn.Linear):
                seen = linears.get(name.rsplit(".", 1)[-1], (0, 0))
                linears[name.rsplit(".", 1)[-1]] = (seen[0] + sub.in_features, seen[1] + sub.out_features)
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
        linears=linears,
    )


def activation_bytes(
    shape: ModelShape, tokens: int, seq_len: int, checkpointing: bool, eager: bool, compute_bytes: int
) -> float:
    """Peak bytes of one forward + backward over ``tokens`` tokens beyond weights and gradients.

    Kept for backward per token: each decoder layer ``6h + 2h_kv + 4i`` values (norm inputs, the
    q/k/v input, attention output, the MLP's gate, up, activation and product; plus ``heads x
    seq_len`` attention probabilities for the eager kernel), the logits and the final norm's input.
    The loss's backward then holds two fp32 logits-sized temporaries and about three fp32
    hidden-sized gradients. With checkpointing only each
    layer's input is kept; the peak is then either at the loss (inputs + logits + temporaries) or
    while one layer is recomputed, whichever is larger.
    """
    per_layer = 6 * shape.hidden + 2 * shape.kv_heads * (shape.hidden // shape.heads) + 4 * shape.intermediate
    if eager:
        per_layer += shape.heads * seq_len
    head = (shape.vocab + shape.hidden) * compute_bytes + 2 * shape.vocab * 4 + 3 * shape.hidden * 4
    if checkpointing:
        inputs = shape.layers * shape.hidden * compute_bytes
        return tokens * (inputs + max(head, per_layer * compute_bytes))
    return tokens * (shape.layers * per_layer * compute_bytes + head)


@dataclass
class Plan:
    """Bytes per device, by part, and the largest per-device batch that fits."""

    parameters: int
    trainable: int
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
    lora_rank: int | None = None,
    lora_targets: list[str] | None = None,
    rule_buffers: int = 0,
) -> Plan:
    """The per-device estimate (see the module docstring for what is counted; ``rule_buffers``:
    parameter-sized buffers a stateful synthesizer keeps, in the buffer dtype, e.g. GRU's average)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if lora_rank is not None and lora_rank < 1:
        raise UserError(f"--lora_rank must be >= 1, got {lora_rank}")
    param_dtype, compute_dtype = PRECISIONS[precision]
    pb, cb = BYTES[param_dtype], BYTES[compute_dtype]
    share = devices if strategy == "fsdp" else 1
    p = shape.parameters / share
    lora_extra = 0.0  # activations per token added by the adapters
    if lora_rank is None:  # full fine-tuning: every weight trains
        trained, tb, frozen = p, pb, 0.0
        gathered: float = 2 * 2 * shape.largest_layer * pb  # params + grads of 2 layers (one prefetched)
    else:  # LoRA: the base is frozen; peft keeps bf16/fp16 models' adapters in float32
        targets = lora_targets or [t for t in LLAMA_LINEAR if t in shape.linears]
        adapters = shape.adapter_parameters(lora_rank, targets)
        trained, tb, frozen = adapters / share, max(pb, 4), p * pb
        per_layer = adapters / max(shape.layers, 1)
        gathered = 2 * (shape.largest_layer * pb + 2 * per_layer * tb)
        # each adapted layer keeps its rank-r intermediate, and a float32 copy of its input when
        # the compute dtype is lower (peft casts the input to the adapter's dtype)
        inputs = sum(shape.linears[t][0] for t in targets) / max(shape.layers, 1)
        lora_extra = shape.layers * (lora_rank * len(targets) * cb + (inputs * tb if cb < tb else 0))
        reference = False  # the reference is the base with its adapters off: no copy
    bb = tb if buffer_dtype == "param" else 4
    buffers = (
        trained * bb + (trained * bb if bb != tb and accumulate > 1 else 0) + rule_buffers * trained * bb
    )
    fixed = {
        "weights": frozen + trained * tb,
        "gradients": trained * tb,
        "task_buffers": buffers,
        "optimizer": trained * tb * (2 if optimizer == "adamw" else 0),
        "reference": p * pb if reference else 0.0,
        "gathered_layers": gathered if strategy == "fsdp" else 0.0,
    }

    def activations(b: int) -> float:
        tokens = b * seq_len
        return activation_bytes(
            shape, tokens, seq_len, activation_checkpointing, eager_attention, cb
        ) + tokens * (0.0 if activation_checkpointing else lora_extra)

    total = sum(fixed.values()) + activations(batch)
    max_batch = None
    if gpu_gib is not None:
        free = gpu_gib * GIB - sum(fixed.values())
        per_sequence = activations(1)
        max_batch = max(0, math.floor(free / per_sequence)) if free > 0 else 0
    return Plan(
        shape.parameters,
        trainable=int(trained * share),
        activations=activations(batch),
        total=total,
        max_batch=max_batch,
        **fixed,
    )


def format_plan(result: Plan, title: str, gpu_gib: float | None = None, batch: int | None = None) -> str:
    """A small table in GiB, then whether it fits a ``gpu_gib`` GPU at ``batch`` sequences per device."""
    rows = [(k, v) for k, v in asdict(result).items() if k not in ("parameters", "trainable", "max_batch")]
    lines = [f"{title}: {result.parameters / 1e9:.2f} B parameters, {result.trainable / 1e6:.1f} M trained"]
    lines += [f"  {name:<16}{value / GIB:>9.2f} GiB" for name, value in rows]
    if result.max_batch is not None:
        lines.append(f"  {'max batch':<16}{result.max_batch:>9d} sequences per device")
    if gpu_gib is not None:
        need = result.total / GIB
        if need <= gpu_gib:
            verdict = f"fits: {need:.2f} of {gpu_gib:g} GiB per GPU"
        elif result.max_batch:
            verdict = (
                f"does not fit: {need:.2f} GiB per GPU > {gpu_gib:g} GiB; "
                f"at most {result.max_batch} sequences per device would"
            )
        else:
            state = (result.total - result.activations) / GIB
            verdict = (
                f"does not fit: {need:.2f} GiB per GPU > {gpu_gib:g} GiB; the state alone is {state:.2f} GiB "
                "(shard it with FSDP, use LoRA, or --buffer_dtype param)"
            )
        lines.append(f"  {verdict}" + (f" (batch {batch})" if batch is not None else ""))
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
    lora_rank: int | None = None,
    lora_targets: list[str] | None = None,
    json_out: str | None = None,
    trust_remote_code: bool = False,
    synthesizer: str = "WeightedSum",
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
        activation_checkpointing: ``--model.network.activation_checkpointing``.
        optimizer: ``adamw`` (two moments) or ``sgd`` (none).
        reference: a frozen reference model is kept (NPO, KL, RMU).
        gpu_gib: memory of one GPU, for the largest batch that fits.
        lora_rank: plan a LoRA run (``--model.network.adapter.rank``): only the adapters train, so the
            gradients, task buffers and optimizer state are adapter-sized (float32 adapters for
            bf16/fp16 models, as ``peft`` keeps them) and no reference copy is kept.
        lora_targets: the adapted linear layers (``--model.network.adapter.target_modules``; default:
            every attention and MLP projection).
        json_out: also write the numbers to this JSON file.
        trust_remote_code: allow custom modelling code from the hub (off by default).
        synthesizer: the rule's class name or path (a stateful rule such as ``GRU`` keeps one more
            parameter-sized buffer).
    """
    buffers = synthesizer_buffers(synthesizer)
    shape = model_shape(model, trust_remote_code)
    result = plan(
        shape, strategy, devices, precision, buffer_dtype, batch, seq_len, accumulate,
        activation_checkpointing, optimizer, reference, gpu_gib=gpu_gib, lora_rank=lora_rank,
        lora_targets=lora_targets, rule_buffers=buffers,
    )  # fmt: skip
    lora = f" · LoRA r={lora_rank}" if lora_rank else ""
    if buffers:
        lora += f" · {synthesizer.rsplit('.', 1)[-1]} keeps {buffers} more buffer{'s' if buffers > 1 else ''}"
    if lora_rank:
        ref = ""  # the reference is the base with its adapters off: nothing to count
    elif reference:
        ref = " · reference model"
    else:
        ref = (
            " · no reference model (NPO, KL, RMU keep one: --reference true, or plan from the run's --config)"
        )
    print(
        format_plan(
            result,
            f"{model} · {strategy} × {devices} · {precision}{lora}{ref} · batch {batch} × {seq_len}"
            f" · {gpu_gib:g} GiB GPUs",
            gpu_gib,
            batch,
        )
    )
    if json_out:
        with open(json_out, "w") as handle:
            json.dump({"model": model, "shape": asdict(shape), **asdict(result)}, handle, indent=2)
    return result


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lit-unlearn-plan``."""
    import sys

    argv = list(sys.argv[1:] if args is None else args)

    def run() -> None:
        run_files, rest = split_run_configs(argv)
        flags = settings_flags(run_settings(run_files)) if run_files else []
        if run_files:
            print(f"settings from {', '.join(run_files)} (flags given after them override them)")
        function_cli("lit-unlearn-plan", main_plan, flags + rest)

    run_reporting_errors("lit-unlearn-plan", run)


def synthesizer_buffers(name: str) -> int:
    """Parameter-sized buffers the synthesizer ``name`` (class name in ``lit_unlearn.synthesis``
    or a full class path) keeps across steps."""
    import importlib

    module, _, cls = name.rpartition(".")
    try:
        rule = getattr(importlib.import_module(module or "lit_unlearn.synthesis"), cls)
    except (ImportError, AttributeError):
        raise UserError(
            f"--synthesizer: cannot import {name!r} (a class of lit_unlearn.synthesis or a class path)"
        ) from None
    return int(getattr(rule, "state_buffers", 0))


def split_run_configs(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate the ``--config`` files that describe a ``lit-unlearn fit`` run (a mapping with
    ``trainer``/``model``/``data``, where ``model`` is a mapping) from the other arguments."""
    import yaml

    run_files, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            path = arg.partition("=")[2]
        if path is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                try:
                    content = yaml.safe_load(handle)
                except yaml.YAMLError as err:
                    raise UserError(
                        f"--config {path}: not valid YAML ({' '.join(str(err).split())[:200]})"
                    ) from None
            if isinstance(content, dict) and (
                set(content) & {"trainer", "data", "checkpoint"} or isinstance(content.get("model"), dict)
            ):
                run_files.append(path)
                i += 1 if arg.startswith("--config=") else 2
                continue
        rest.append(arg)
        i += 1
    return run_files, rest


def run_settings(files: list[str]) -> dict[str, Any]:
    """The planner's arguments that a run's configuration files determine (parsed by the
    ``lit-unlearn`` parser itself, so file references and defaults resolve as for ``fit``)."""
    import importlib

    from lit_unlearn.cli import _get, parse_run_config

    config = parse_run_config(files)
    network = _get(config, "model.network")
    net = (_get(network, "init_args") or network) if network is not None else None
    settings: dict[str, Any] = {}
    path = _get(net, "path")
    if isinstance(path, str):
        settings["model"] = path
    if _get(net, "activation_checkpointing") is not None:
        settings["activation_checkpointing"] = bool(_get(net, "activation_checkpointing"))
    if _get(net, "trust_remote_code") is not None:
        settings["trust_remote_code"] = bool(_get(net, "trust_remote_code"))
    adapter = _get(net, "adapter")
    if adapter is not None:
        args = _get(adapter, "init_args") or adapter
        settings["lora_rank"] = int(_get(args, "rank") or 8)
        targets = _get(args, "target_modules")
        if targets:
            settings["lora_targets"] = list(targets)
    reference = False
    for key in ("model.forget_objective", "model.retain_objective"):
        spec = _get(config, key)
        class_path = _get(spec, "class_path")
        if not class_path:
            continue
        module, _, name = str(class_path).rpartition(".")
        objective = getattr(importlib.import_module(module), name)(**dict(_get(spec, "init_args") or {}))
        reference = reference or bool(getattr(objective, "requires_reference", False))
    settings["reference"] = reference
    rule = _get(config, "model.synthesizer.class_path")
    if rule:
        settings["synthesizer"] = str(rule)
    optimizer = str(_get(config, "model.optimizer.class_path") or "")
    settings["optimizer"] = "sgd" if optimizer.endswith(".SGD") else "adamw"
    for key, name in (("model.grad_buffer_dtype", "buffer_dtype"), ("model.accumulate_grad_batches", "accumulate"),
                      ("data.max_length", "seq_len")):  # fmt: skip
        if _get(config, key) is not None:
            settings[name] = _get(config, key)
    batches = [_get(config, f"data.{t}_batch_size") for t in ("forget", "retain")]
    if any(isinstance(b, int) for b in batches):
        settings["batch"] = max(b for b in batches if isinstance(b, int))
    devices, nodes = _get(config, "trainer.devices"), _get(config, "trainer.num_nodes") or 1
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        settings["devices"] = int(devices) * int(nodes)
    strategy = _get(config, "trainer.strategy")
    strategy_name = str(_get(strategy, "class_path") or strategy or "").lower()
    settings["strategy"] = "fsdp" if ("fsdp" in strategy_name or "modelparallel" in strategy_name) else "ddp"
    precision = str(_get(config, "trainer.precision") or "32-true")
    settings["precision"] = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-true"}.get(precision, precision)
    return settings


def settings_flags(settings: dict[str, Any]) -> list[str]:
    """``--name=value`` flags for :func:`main_plan`."""
    flags = []
    for name, value in settings.items():
        text = json.dumps(value) if isinstance(value, (list, bool)) else str(value)
        flags.append(f"--{name}={text}")
    return flags


def as_dict(result: Plan) -> dict[str, Any]:
    return asdict(result)
