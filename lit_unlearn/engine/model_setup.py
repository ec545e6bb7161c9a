"""The network to unlearn: where it is loaded from and how it is prepared for training.

:class:`ModelSetup` is the engine's model component (``--model.network.*``): loading (hub id,
local directory or ``scheme://`` provider, dtype, attention kernel, revision, remote code),
low-rank adapters, the trainable-parameter regex, activation checkpointing, FSDP2 sharding and
the frozen reference model. The engine calls it; it never sees a gradient.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_unlearn.adapters import AdaptersOff, LoRA, is_adapted
from lit_unlearn.errors import UserError
from lit_unlearn.models import (
    DTYPES,
    check_model_path,
    compile_trainable,
    enable_activation_checkpointing,
    frozen_copy,
    load_causal_lm,
    select_trainable,
    shard_with_fsdp2,
)

DEFAULT_MODEL = "synthetic://default"
FLAG = "--model.network"


class ModelSetup:
    """Loads and prepares the causal LM to unlearn.

    Args:
        path: hub id or local directory of the causal LM, or ``synthetic://default`` /
            ``synthetic://smoke`` for the embedded benchmark's target (built once, then cached).
            Loaded when training is set up, after the data have been read. From Python, an
            already loaded ``nn.Module`` is accepted too.
        dtype: weight dtype when loading by name: ``float32``, ``bfloat16``, ``float16``, ``auto``.
        attn_implementation: attention kernel (``sdpa``, ``eager``, ``flash_attention_2``).
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        revision: hub revision of ``path`` (a commit hash pins the exact weights, tokenizer and
            generation config; the CLI passes it on to the tokenizer). ``None`` = the default branch.
        adapter: train low-rank adapters instead of the weights (``lit_unlearn.adapters.LoRA``,
            e.g. ``--config configs/adapter/lora.yaml``): the task buffers are adapter-sized, the
            reference model is the same network with the adapters off, and ``unlearned_model/``
            holds the adapter (plus the merged model with ``merge_on_save``). ``None`` = full
            fine-tuning.
        trainable_parameters: regex on parameter names; only matches are trained (RMU:
            ``layers\\.(5|6|7)\\.mlp\\.down_proj``). ``None`` = all parameters.
        activation_checkpointing: recompute each decoder layer's activations in the backward passes
            instead of keeping them (non-reentrant; less memory, ~1/3 more compute); works with
            DDP and FSDP and with both task backward passes.
    """

    def __init__(
        self,
        path: str = DEFAULT_MODEL,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        adapter: LoRA | None = None,
        trainable_parameters: str | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise UserError(f"{FLAG}.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self._pattern = compile_trainable(trainable_parameters)
        self._given: nn.Module | None = path if isinstance(path, nn.Module) else None
        if isinstance(path, str):
            check_model_path(path, f"{FLAG}.path")  # a mistyped local path fails now, not after the data
        self.path = path if isinstance(path, str) else type(path).__name__
        self.dtype, self.attn_implementation = dtype, attn_implementation
        self.trust_remote_code, self.revision = trust_remote_code, revision
        self.adapter, self.trainable_parameters = adapter, trainable_parameters
        self.activation_checkpointing = activation_checkpointing

    @property
    def loaded(self) -> nn.Module | None:
        """The module given from Python, if any (loading by name happens in :meth:`load`)."""
        return self._given

    def load(self) -> nn.Module:
        """The prepared network: loaded by name (or the module given), adapters added, trainable
        parameters selected, activation checkpointing on."""
        model = self._given or load_causal_lm(
            self.path, self.dtype, self.attn_implementation, self.trust_remote_code, self.revision
        )
        return self.prepare(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Adapters, trainable parameters and activation checkpointing on an already loaded model."""
        if self.adapter is not None and not is_adapted(model):
            model = self.adapter.apply(model)
        select_trainable(model, self._pattern, f"{FLAG}.trainable_parameters")
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
            if is_adapted(model):
                # frozen embeddings: make the first layer's input require grad, so checkpointed
                # layers pass gradients to their adapters with any checkpoint implementation
                model.enable_input_require_grads()  # type: ignore[operator]
        return model

    def check(self, model: nn.Module, precision: str, max_length: int | None) -> None:
        """Refuse data longer than the model's context; warn about half-precision adapters."""
        if self.adapter is not None and precision in ("bf16-true", "16-true"):
            rank_zero_warn(
                f"--trainer.precision {precision} casts the LoRA adapters to half precision too; for float32 "
                f"adapters on a bf16 base (peft's default) use {FLAG}.dtype bfloat16 --trainer.precision 32-true"
            )
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_length is not None and context is not None and max_length > context:
            raise UserError(
                f"--data.max_length={max_length} exceeds the model's context ({context} positions)"
            )

    @staticmethod
    def reference(model: nn.Module) -> nn.Module:
        """π_ref, the model at the start of unlearning: a frozen copy, or with adapters (whose base
        weights never change) the same network with its adapters off."""
        return AdaptersOff(model) if is_adapted(model) else frozen_copy(model)

    @staticmethod
    def shard(model: nn.Module, reference: nn.Module | None, strategy: Any) -> None:
        """Under Lightning's ``ModelParallelStrategy``: FSDP2 over the data-parallel mesh, every
        decoder layer then the root (the reference too, unless it is the model itself with
        adapters off), once. Other strategies: nothing. Tensor parallelism is refused."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(strategy, ModelParallelStrategy) or getattr(model, "_lit_unlearn_sharded", False):
            return
        mesh = strategy.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise UserError(
                "--trainer.strategy: ModelParallelStrategy with tensor_parallel_size > 1 is not supported; "
                "lit-unlearn shards with FSDP2 only (set tensor_parallel_size: 1)"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        shard_with_fsdp2(model, dp_mesh)
        if reference is not None and not isinstance(reference, AdaptersOff):
            shard_with_fsdp2(reference, dp_mesh)
        object.__setattr__(model, "_lit_unlearn_sharded", True)

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={v!r}"
            for k, v in (
                ("dtype", self.dtype),
                ("adapter", self.adapter),
                ("trainable_parameters", self.trainable_parameters),
            )
            if v not in (None, "float32")
        )
        return f"{type(self).__name__}({self.path!r}{extra})"
