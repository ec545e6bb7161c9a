"""The objective contract and the helpers objectives share (forward passes, layer capture)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_unlearn.models import decoder_layers

Batch = dict[str, Tensor]
Terms = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]
"""What :meth:`Objective.loss_terms` returns: ``(total, count)`` or ``(total, count, metrics)``."""


def split_terms(terms: Terms) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(total, count, metrics)`` whichever form an objective returned."""
    if len(terms) == 3:
        return terms[0], terms[1], terms[2]  # type: ignore[misc]
    return terms[0], terms[1], {}


def model_inputs(batch: Batch) -> dict[str, Tensor]:
    """The keys a causal LM takes (drops ``labels`` and bookkeeping such as ``index``)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@contextlib.contextmanager
def capture_layer_output(model: nn.Module, layer: int) -> Iterator[dict[str, Tensor]]:
    """Record the hidden states leaving decoder layer ``layer`` during the forward passes inside."""
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} decoder layers")
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class Objective(ABC):
    """A forget or retain loss ``L(model, batch)``, minimized by the engine.

    Forget objectives are written so that *descending* them forgets.

    An objective is a mean over *units* — label tokens or whole sequences (:attr:`unit`).
    :meth:`loss_terms` returns the sum over the units of one micro-batch and their number; the
    engine adds both up over every micro-batch and rank of an optimizer step and divides once,
    so an optimizer step sees the true mean of the effective batch whatever the sequence lengths.
    """

    requires_reference: bool = False
    """Whether :meth:`loss_terms` needs the frozen reference model ``π_ref``."""

    needs_alternates: bool = False
    """Whether forget batches must carry an ``alternate`` sub-batch (a preferred answer per
    example, e.g. a refusal); a run whose forget data has none stops before the model loads."""

    unit: Literal["token", "sequence"] = "token"
    """What the loss is a mean over: label tokens (NLL, GA, KL, RMU, EmbedDiff) or sequences (NPO, SimNPO)."""

    def setup(self, model: nn.Module) -> None:
        """Called once before training with the (unwrapped) model; e.g. to draw random vectors."""

    def prepare(self, model: nn.Module, forget_batches: Iterable[Batch] | None) -> None:
        """Called at fit start with the model and a lazy iterable of the forget set in dataset
        order (for precomputation; untouched by objectives that do not need it)."""

    @abstractmethod
    def loss_terms(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Terms:
        """``(total, count)``: the loss summed over the units of one micro-batch, and the number of
        units (a 0-dim integer or float tensor, on the loss's device; no host sync).

        An objective may add a third element, ``{name: sum over the same units}`` (0-dim tensors,
        no graph needed): the engine accumulates them like the loss and logs the effective-batch
        mean as ``train/<forget|retain>_<name>`` on logging steps.
        """

    def loss(self, model: nn.Module, batch: Batch, reference: nn.Module | None) -> Tensor:
        """The mean loss of one batch (``total / count``)."""
        total, count, _ = split_terms(self.loss_terms(model, batch, reference))
        return total / count.clamp_min(1)

    def uniform_loss(self, model: nn.Module) -> float | None:
        """The loss of a model that predicts the uniform distribution, when it is defined
        (``ln V`` for next-token NLL); the engine's collapse guard compares the retain loss with it."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Objective state that must survive a checkpoint (e.g. precomputed reference values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def reference_forward(reference: nn.Module | None, batch: Batch, name: str) -> Any:
    """Run the frozen reference without building a graph."""
    if reference is None:
        raise RuntimeError(f"{name} needs the frozen reference model, but none was built")
    with torch.no_grad():
        return reference(**model_inputs(batch))
