"""Rules from other unlearning code bases, on our engine: BLUR (forget-first) and GRU.

Both use one global coefficient (dot products over every trainable tensor, summed through the
rule's ``reducer`` so they are whole-vector values under FSDP) and no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from lit_unlearn.synthesis.base import (
    ChunkKernel,
    Granularity,
    RetainGuarantee,
    Synthesizer,
    dot32,
)

EPS = 1e-10


def _scaled_sum_kernel(scale: Tensor, weight: float) -> ChunkKernel:
    """``out = weight · a + scale · b`` on chunks (``scale`` a 0-dim device tensor)."""

    def kernel(a: Tensor, b: Tensor, o: Tensor, scratch: Tensor, _: Tensor) -> None:
        torch.mul(b, scale, out=scratch)
        torch.add(scratch, a, alpha=weight, out=o)

    return kernel


class BLUR(Synthesizer):
    """The paper's sixth strategy, ``blur``: the retain gradient loses its component along the
    forget gradient, unconditionally.

    ``c = ⟨g_r, g_f⟩ / (‖g_f‖² + ε)`` over all trainable tensors; ``u = γ g_f + α (g_r − c g_f)``.
    There is no conflict test: the projection happens at every step, whatever the sign of ``c``.

    This rule is *forget-first*: the retain term is made orthogonal to ``g_f``, so
    ``⟨u, g_f⟩ = γ‖g_f‖² + α⟨g_r, g_f⟩ ε / (‖g_f‖² + ε) ≈ γ‖g_f‖² ≥ 0`` — the forget direction is
    protected — while ``⟨u, g_r⟩ = γ⟨g_f, g_r⟩ + α(‖g_r‖² − ⟨g_f, g_r⟩²/‖g_f‖²)`` is negative
    whenever the conflict is strong enough. It makes no promise to retention; it is the control
    for the retention-first rules (PCGrad, SAGO).

    Example (α = γ = 1; ``⟨g_r, g_f⟩ = 2``, ``‖g_f‖² = 4``, so ``c = 0.5``):

    >>> import torch
    >>> BLUR()([torch.tensor([2.0, 0.0])], [torch.tensor([1.0, 1.0])])[0]
    tensor([2., 1.])

    Args:
        forget_weight: γ, the weight of the forget gradient.
        retain_weight: α, the weight of the projected retain gradient.
        eps: added to ``‖g_f‖²`` in the coefficient.
    """

    granularity: ClassVar[Granularity] = "global"
    retain_guarantee: ClassVar[RetainGuarantee | None] = None

    def __init__(self, forget_weight: float = 1.0, retain_weight: float = 1.0, eps: float = EPS) -> None:
        super().__init__(forget_weight, retain_weight)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)

    def terms(self, forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor]:
        return dot32(forget, retain), dot32(forget, forget)

    def summarize(self, totals: Tensor) -> Any:
        dot, sq = totals.unbind(-1)
        coefficient = dot / (sq + self.eps)
        # u = (γ − α c) g_f + α g_r: the scale of g_f, one 0-dim tensor for every tensor
        return {"scale": self.forget_weight - self.retain_weight * coefficient, "coefficient": coefficient}

    def tensor_statistics(self, state: Any, index: int) -> Tensor:
        return state["scale"]

    def combine(self, forget: Tensor, retain: Tensor, stats: Any = None) -> Tensor:
        return stats * forget + self.retain_weight * retain

    def fused_kernel(self, stats: Any) -> ChunkKernel:
        alpha = self.retain_weight
        kernel = _scaled_sum_kernel(stats, alpha)
        return lambda f, r, o, a, b: kernel(r, f, o, a, b)  # α g_r + s g_f

    def report(self, state: Any) -> dict[str, Tensor]:
        return {"blur_coefficient": state["coefficient"]}

    def _extra_repr(self) -> str:
        return "" if self.eps == EPS else f"eps={self.eps:g}"


class GRU(Synthesizer):
    """Projection of the forget gradient against a moving average of the retain gradient (GRU,
    as open-unlearning implements it); the update is the (projected) forget gradient alone.

    ``r̄_t = ema · g_r,t + (1 − ema) · r̄_{t−1}`` with ``r̄_0 = 0``; ``d = ⟨g_f, r̄_t⟩`` over all
    trainable tensors; if ``d < 0``, ``g_f ← g_f − d / (‖r̄_t‖² + ε) · r̄_t``; ``u = γ g_f``. The
    retain gradient enters only through the projection (its weight is not a setting).

    Stateful: ``r̄`` is one more buffer of the trainable parameters' size (this rank's shards under
    FSDP, the adapters under LoRA), in the dtype of the forget buffer
    (``--model.grad_buffer_dtype``). It is part of :meth:`state_dict` and so of every checkpoint:
    a resumed run continues the same average. The memory planner counts it
    (:attr:`state_buffers`). A skipped step (non-finite loss) leaves the average unchanged.

    Guarantee: ``⟨u, r̄_t⟩ ≥ 0`` (against the average), none against the current ``g_r``.

    Example (γ = 1, ema = 0.5, first step so ``r̄ = 0.5 g_r = (0.5, 0)``; ``d = −0.5``, so
    ``g_f ← g_f + 2 r̄``):

    >>> import torch
    >>> GRU(ema=0.5)([torch.tensor([-1.0, 1.0])], [torch.tensor([1.0, 0.0])])[0]
    tensor([0., 1.])

    Args:
        forget_weight: γ, the weight of the projected forget gradient.
        ema: the weight of the newest retain gradient in the moving average (in (0, 1]).
        eps: added to ``‖r̄‖²`` in the projection coefficient.
    """

    granularity: ClassVar[Granularity] = "global"
    retain_guarantee: ClassVar[RetainGuarantee | None] = None
    state_buffers: ClassVar[int] = 1
    parameter_state_keys: ClassVar[tuple[str, ...]] = ("average",)

    def __init__(self, forget_weight: float = 1.0, ema: float = 0.8, eps: float = EPS) -> None:
        super().__init__(forget_weight, retain_weight=0.0)
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.ema, self.eps = float(ema), float(eps)
        self.average: list[Tensor] | None = None  # r̄, one tensor per trainable tensor

    def _average_for(self, forget: list[Tensor], retain: list[Tensor]) -> list[Tensor]:
        shapes = [(tuple(r.shape), r.device) for r in retain]
        if self.average is None:
            self.average = [
                torch.zeros(r.shape, dtype=f.dtype, device=r.device) for f, r in zip(forget, retain)
            ]
        elif [(tuple(a.shape), a.device) for a in self.average] != shapes:
            if [tuple(a.shape) for a in self.average] != [s for s, _ in shapes]:
                raise ValueError(
                    "GRU: the saved moving average does not match the trainable tensors "
                    f"({len(self.average)} saved, {len(retain)} now, or different shapes); "
                    "resume with the same trainable parameters and the same number of shards"
                )
            self.average = [a.to(r.device) for a, r in zip(self.average, retain)]
        return self.average

    def partial_sums(self, forget: list[Tensor], retain: list[Tensor]) -> Tensor:
        """Move the average (``r̄ ← ema · g_r + (1 − ema) · r̄``, in place) and return this shard's
        ``(⟨g_f, r̄⟩, ‖r̄‖²)``: one pass over ``g_f``, ``g_r`` and ``r̄``."""
        assert self.average is not None  # _average_for() ran first
        totals = torch.zeros(2, dtype=torch.float32, device=retain[0].device if retain else "cpu")
        for f, r, a in zip(forget, retain, self.average):
            a.mul_(1.0 - self.ema).add_(r.to(a.dtype), alpha=self.ema)
            totals = totals + torch.stack([dot32(f, a), dot32(a, a)])
        return totals

    def summarize(self, totals: Tensor) -> Any:
        dot, sq = totals.unbind(-1)
        coefficient = torch.where(dot < 0, dot / (sq + self.eps), torch.zeros_like(dot))
        return {"scale": -self.forget_weight * coefficient, "projected": dot < 0}

    def statistics(
        self, forget: list[Tensor], retain: list[Tensor], sums: Callable[..., Tensor] | None = None
    ) -> Any:
        self._average_for(forget, retain)
        return self.summarize(self.reducer((sums or self.partial_sums)(forget, retain)))

    def combine_operand(self, forget: list[Tensor], retain: list[Tensor]) -> list[Tensor]:
        """The moving average ``r̄`` (moved by :meth:`statistics`) in place of the retain gradient."""
        assert self.average is not None
        return self.average

    def tensor_statistics(self, state: Any, index: int) -> Tensor:
        return state["scale"]

    def combine(self, forget: Tensor, retain: Tensor, stats: Any = None) -> Tensor:
        """``γ g_f + s r̄`` — for this rule the second argument is the moving average's chunk
        (:meth:`combine_operand`: it stands in place of the retain gradient)."""
        return self.forget_weight * forget + stats * retain

    def fused_kernel(self, stats: Any) -> ChunkKernel:
        return _scaled_sum_kernel(stats, self.forget_weight)

    def report(self, state: Any) -> dict[str, Tensor]:
        return {"projected_fraction": state["projected"].float()}

    def state_dict(self) -> dict[str, Any]:
        """The moving average ``r̄`` (absent before the first step; the tensors themselves, which
        a checkpoint serialises at once)."""
        return {} if self.average is None else {"average": [a.detach() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``r̄``; without an ``average`` entry (a sharded checkpoint restores it with the
        parameters, through :meth:`parameter_state`) the current one is kept."""
        if "average" in state:
            average = state["average"]
            self.average = None if average is None else [torch.as_tensor(a).clone() for a in average]

    def parameter_state(
        self, shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device
    ) -> dict[str, list[Tensor]]:
        """``{"average": r̄}``, zeros (``r̄_0``) of ``shapes`` before the first step."""
        if self.average is None:
            self.average = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        return {"average": self.average}

    def __repr__(self) -> str:
        extra = "" if self.eps == EPS else f", eps={self.eps:g}"
        return f"GRU(forget_weight={self.forget_weight:g}, ema={self.ema:g}{extra})"
