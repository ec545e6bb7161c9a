"""Parameter-efficient unlearning: LoRA adapters (``peft``) as the only trainable parameters.

With an adapter, the two task buffers have the size of the adapters, every synthesizer works
unchanged (for PCGrad a "module" is one adapter tensor: ``lora_A`` and ``lora_B`` of a layer are
separate tensors), and the frozen reference model that NPO, KL and RMU need is the same network
with its adapters switched off — no second copy of the weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lit_unlearn.errors import UserError

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRA:
    """A LoRA adapter on the model's linear layers (``peft.LoraConfig``).

    Args:
        rank: the adapters' rank ``r``.
        alpha: scaling numerator (the update is ``alpha / rank · B A``).
        dropout: dropout on the adapters' input.
        target_modules: names of the linear layers that get adapters (default: every attention
            and MLP projection of Llama-style models).
        merge_on_save: also write ``unlearned_model/merged/``, the base weights with the adapters
            merged in (a plain checkpoint), next to the adapter itself.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        merge_on_save: bool = False,
    ) -> None:
        if rank < 1:
            raise UserError(f"--model.network.adapter.rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.target_modules = target_modules or list(LLAMA_LINEAR)
        self.merge_on_save = merge_on_save

    def apply(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` with fresh adapters; only the adapters require gradients."""
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in self.target_modules if m not in present]
        if missing:
            raise UserError(
                f"--model.network.adapter.target_modules: {missing} are not layers of {type(model).__name__} "
                f"(it has e.g. {sorted(n for n in present if n)[:8]})"
            )
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
        )
        adapted = get_peft_model(model, config)
        # a local base folder is recorded absolute, so the saved adapter loads from anywhere
        # (peft records the path as given; hub ids stay as they are)
        base = adapted.peft_config["default"].base_model_name_or_path
        if base and not os.path.isabs(base) and os.path.isdir(base):
            adapted.peft_config["default"].base_model_name_or_path = os.path.abspath(base)
        return adapted


def is_adapted(model: Any) -> bool:
    """Whether ``model`` carries ``peft`` adapters."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdaptersOff(nn.Module):
    """The reference model of an adapted network: the same weights with the adapters switched off.

    Forward passes (and ``capture_layer_output`` hooks on its decoder layers) run the wrapped
    model inside ``disable_adapter()``; nothing is copied.

    Args:
        model: a ``peft`` model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "adapted", model)  # not a submodule: never trained, never saved

    @property
    def layers(self) -> nn.ModuleList:
        from lit_unlearn.models import decoder_layers

        adapted: Any = self.adapted
        return decoder_layers(adapted)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.adapters_off():
            return self.adapted(*args, **kwargs)

    @contextmanager
    def adapters_off(self) -> Iterator[None]:
        with self.adapted.disable_adapter():
            yield

    def to(self, *args: Any, **kwargs: Any) -> AdaptersOff:  # the weights are the trained model's
        return self


def merged_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The base model's weights with the adapters merged in (``W + alpha / rank · B A``), keyed as
    the plain model's own state dict.

    Pure tensor arithmetic on ``state`` (the full weights of the adapted model; default: its own
    ``state_dict()``, which is only right for an unsharded model), so it never runs the model:
    with FSDP2 every rank gathers ``state`` and rank 0 alone merges and saves, where ``peft``'s
    ``merge_and_unload`` would touch sharded parameters on one rank and hang the others.
    """
    from peft.tuners.lora import LoraLayer

    state = dict(model.state_dict() if state is None else state)
    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        weight = state.pop(f"{name}.base_layer.weight")
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for adapter in layer.active_adapters:
            a = state.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = state.pop(f"{name}.lora_B.{adapter}.weight").float()
            delta += layer.scaling[adapter] * (b @ a)
        merged[f"{name.removeprefix(prefix)}.weight"] = (weight.float() + delta).to(weight.dtype)
        bias = state.pop(f"{name}.base_layer.bias", None)
        if bias is not None:
            merged[f"{name.removeprefix(prefix)}.bias"] = bias
    leftover = [k for k in state if ".lora_" in k]
    if leftover:
        raise ValueError(f"cannot merge adapter tensors {leftover[:3]}: not attached to a LoRA layer")
    merged.update({k.removeprefix(prefix): v for k, v in state.items()})
    return merged


def adapter_weights(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the trainable (adapter) parameters, for the no-change guard."""
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]
