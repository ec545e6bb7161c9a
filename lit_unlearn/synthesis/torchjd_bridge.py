"""TorchJD's multi-objective aggregators as synthesizers, without building the gradient matrix.

A TorchJD aggregator ``A`` maps the matrix ``J = [α g_r ; γ g_f]`` (retain first) to one update.
For the Gramian-weighted ones (UPGrad, MGDA, DualProj, IMTLG, AlignedMTL, PCD, ...) the update is
``w_0 α g_r + w_1 γ g_f`` with weights ``w = W(J Jᵀ)`` that depend on the 2 × 2 Gramian only. The
bridge builds that Gramian from three dot products (reduced across shards like every other
statistic), asks the aggregator's own weighting for ``w``, and combines shard-locally: the
``[2, n]`` matrix is never formed, so it runs under DDP and FSDP with no extra memory.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lit_unlearn.synthesis.base import (
    ChunkKernel,
    Granularity,
    RetainGuarantee,
    Synthesizer,
    dot32,
)

EXTRA = "lit_unlearn[torchjd]"


def _gramian_weighting(aggregator: nn.Module) -> nn.Module:
    weighting = getattr(aggregator, "gramian_weighting", None)
    if not isinstance(weighting, nn.Module):
        raise ValueError(
            f"TorchJD: {type(aggregator).__name__} needs the whole gradient matrix, not only its Gramian "
            "(e.g. ConFIG, GradDrop, NashMTL, Krum, TrimmedMean); the bridge takes the aggregators whose "
            "weights depend on the Gramian: UPGrad, MGDA, DualProj, IMTLG, AlignedMTL, PCD, CAGrad, ..."
        )
    return weighting


def _is_stateful(module: nn.Module) -> bool:
    from torchjd._mixins import Stateful

    return any(isinstance(m, Stateful) for m in module.modules())


class TorchJD(Synthesizer):
    """A TorchJD aggregator applied to ``[α g_r ; γ g_f]`` (retain is row 0, so priority
    aggregators such as PCD treat retention as the primary objective).

    ``scope="global"`` weighs the two whole gradients once (one Gramian over every trainable
    tensor); ``scope="tensor"`` gives each tensor its own Gramian and weights (module-wise, like
    PCGrad). The aggregator's weighting runs on a 2 × 2 matrix (some solve a small quadratic program
    on the CPU: one host synchronisation per step, or per tensor with ``scope="tensor"``).

    Stateful weightings (PCD's moving average of squared norms, GradVac's) keep their state in
    :meth:`state_dict`, hence in every checkpoint, so a resumed run continues them; they need
    ``scope="global"`` (one state for one problem).

    Needs ``torchjd`` (``pip install 'lit_unlearn[torchjd]'``). In YAML::

        synthesizer:
          class_path: lit_unlearn.synthesis.TorchJD
          init_args:
            aggregator: {class_path: torchjd.aggregation.UPGrad}

    Args:
        aggregator: a TorchJD aggregator whose weights depend on the Gramian only (its
            ``gramian_weighting``); others are refused with the reason.
        forget_weight: γ, the scale of the forget row.
        retain_weight: α, the scale of the retain row.
        scope: ``global`` (one Gramian) or ``tensor`` (one per parameter tensor).
    """

    granularity: ClassVar[Granularity] = "global"
    retain_guarantee: ClassVar[RetainGuarantee | None] = None

    def __init__(
        self,
        aggregator: nn.Module,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        scope: Literal["global", "tensor"] = "global",
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        try:
            import torchjd  # noqa: F401
        except ImportError:
            raise ImportError(f"TorchJD needs the torchjd package: pip install '{EXTRA}'") from None
        if scope not in ("global", "tensor"):
            raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
        self.aggregator, self.scope = aggregator, scope
        self.weighting = _gramian_weighting(aggregator)
        if scope == "tensor" and _is_stateful(self.weighting):
            raise ValueError(
                f"TorchJD: {type(aggregator).__name__} keeps a state across steps (a moving average); with "
                "scope='tensor' every tensor would update the same state; use scope='global'"
            )
        self.granularity = scope  # type: ignore[misc]  # per instance: what this bridge reduces

    def _gramians(self, dots: Tensor) -> Tensor:
        """``[..., 3]`` sums ``(⟨g_r,g_r⟩, ⟨g_r,g_f⟩, ⟨g_f,g_f⟩)`` → ``[..., 2, 2]`` Gramians of
        ``[α g_r ; γ g_f]`` (float64: the weightings solve small problems precisely)."""
        a, g = self.retain_weight, self.forget_weight
        rr, rf, ff = dots.double().unbind(-1)
        top = torch.stack([a * a * rr, a * g * rf], -1)
        bottom = torch.stack([a * g * rf, g * g * ff], -1)
        return torch.stack([top, bottom], -2)

    def terms(self, forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The Gramian's entries, in float32 (float64 for float64 gradients: the scales follow)."""
        if torch.float64 in (forget.dtype, retain.dtype):
            f, r = forget.double().reshape(-1), retain.double().reshape(-1)
            return torch.dot(r, r), torch.dot(r, f), torch.dot(f, f)
        return dot32(retain, retain), dot32(retain, forget), dot32(forget, forget)

    def summarize(self, totals: Tensor) -> Any:
        gramians = self._gramians(totals)
        if self.scope == "global":
            gramians = gramians[None]
        elif not len(gramians):
            return {"scales": torch.zeros(0, 2, dtype=totals.dtype, device=totals.device)}
        weights = torch.stack([self.weighting(G) for G in gramians]).to(torch.float64)
        scales = weights * torch.tensor([self.retain_weight, self.forget_weight], dtype=torch.float64)
        return {"scales": scales.to(device=totals.device, dtype=totals.dtype), "weights": weights}

    def tensor_statistics(self, state: Any, index: int) -> Tensor:
        scales = state["scales"]
        return scales[0] if self.scope == "global" else scales[index]

    def combine(self, forget: Tensor, retain: Tensor, stats: Any = None) -> Tensor:
        return stats[0] * retain + stats[1] * forget

    def fused_kernel(self, stats: Any) -> ChunkKernel:
        retain_scale, forget_scale = stats[0], stats[1]

        def kernel(f: Tensor, r: Tensor, o: Tensor, a: Tensor, b: Tensor) -> None:
            torch.mul(r, retain_scale, out=a)
            torch.mul(f, forget_scale, out=b)
            torch.add(a, b, out=o)

        return kernel

    def report(self, state: Any) -> dict[str, Tensor]:
        if "weights" not in state:
            return {}
        weights = state["weights"].float().mean(0)
        return {"retain_row_weight": weights[0], "forget_row_weight": weights[1]}

    def state_dict(self) -> dict[str, Any]:
        """The weighting's state across steps (buffers and counters of stateful weightings such as
        PCD's moving average); empty for stateless ones."""
        state: dict[str, Any] = {}
        for prefix, module in self.weighting.named_modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    state[f"{prefix}.{name}" if prefix else name] = buffer.detach().clone()
            for name, value in vars(module).items():
                if name.startswith("_state") and isinstance(value, (int, type(None))):
                    state[f"{prefix}.{name}" if prefix else name] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        modules = dict(self.weighting.named_modules())
        for key, value in state.items():
            prefix, _, name = key.rpartition(".")
            module = modules.get(prefix)
            if module is None:
                raise ValueError(f"TorchJD: the saved state has {key!r}, which this aggregator does not keep")
            if isinstance(value, Tensor):
                module._buffers[name] = value.clone()
            else:
                setattr(module, name, value)

    def __repr__(self) -> str:
        scope = "" if self.scope == "global" else ", scope='tensor'"
        return (
            f"TorchJD({self.aggregator!r}, forget_weight={self.forget_weight:g}, "
            f"retain_weight={self.retain_weight:g}{scope})"
        )
