"""PCGrad adapted to unlearning: project only the forget gradient, per tensor or globally."""

from __future__ import annotations

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

EPS = 1e-10  # added to ||g_r||^2, the reference implementation's value


def _projected_scales(dots: Tensor, sq_norms: Tensor, alpha: float, gamma: float, eps: float) -> Tensor:
    """Per-entry coefficient ``s`` of ``g_r`` in ``u = γ g_f + s g_r`` after asymmetric projection.

    Projection ``g_f ← g_f − c g_r`` with ``c = ⟨g_f,g_r⟩ / (‖g_r‖² + ε)`` happens only where the
    dot product is negative (zero is never a conflict), so ``s = α − γ c`` there and ``α`` elsewhere.
    """
    coef = torch.where(dots < 0, dots / (sq_norms + eps), torch.zeros_like(dots))
    return alpha - gamma * coef


class _ProjectionBase(Synthesizer):
    """Shared combine step of the PCGrad rules: ``u^j = γ g_f^j + s_j g_r^j``."""

    def __init__(
        self,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        eps: float = EPS,
    ) -> None:
        super().__init__(forget_weight, retain_weight)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)

    def _extra_repr(self) -> str:
        return "" if self.eps == EPS else f"eps={self.eps:g}"

    def tensor_statistics(self, state: Any, index: int) -> Tensor:
        """The coefficient ``s_j`` of ``g_r^j`` (0-dim device tensor)."""
        return state["scales"][index] if state["scales"].dim() else state["scales"]

    def combine(self, forget: Tensor, retain: Tensor, stats: Any = None) -> Tensor:
        return stats * retain + self.forget_weight * forget

    def fused_kernel(self, stats: Any) -> ChunkKernel:
        scale, gamma = stats, self.forget_weight

        def kernel(f: Tensor, r: Tensor, o: Tensor, a: Tensor, b: Tensor) -> None:
            torch.mul(r, scale, out=b)
            torch.add(b, f, alpha=gamma, out=o)

        return kernel

    def report(self, state: Any) -> dict[str, Tensor]:
        return {"projected_fraction": state["projected"].float().mean()}


class PCGrad(_ProjectionBase):
    """Module-wise asymmetric PCGrad (Yu et al. 2020, adapted in arXiv 2604.14808).

    For each parameter tensor ``j``: if ``⟨g_f^j, g_r^j⟩ < 0`` then
    ``g_f^j ← g_f^j − ⟨g_f^j, g_r^j⟩ / (‖g_r^j‖² + ε) · g_r^j``; then ``u^j = α g_r^j + γ g_f^j``.
    Only the forget gradient is ever changed; ε = 1e-10.

    Granularity: tensor (dot products and norms per tensor, all computed in float32 in one pass
    and reduced with one ``reducer`` call, with no host synchronisation).
    Guarantee: ``⟨u^j, g_r^j⟩ ≥ 0`` for every tensor ``j`` (α, γ ≥ 0).
    Exactly, ``⟨u^j, g_r^j⟩ = α‖g_r^j‖² + γ⟨g_f^j, g_r^j⟩ · ε / (‖g_r^j‖² + ε)`` on projected
    tensors, so the guarantee needs ``‖g_r^j‖² ≫ ε``; a tensor whose squared retain-gradient
    norm is ~1e-10 or smaller (tiny norm weights in bf16) is only partly projected. Lower
    ``eps`` if that matters to you.

    Example (α = γ = 1; ``⟨g_f, g_r⟩ = -2``, ``‖g_r‖² = 2`` so ``g_f ← g_f + g_r``):

    >>> import torch
    >>> PCGrad()([torch.tensor([-2.0, 0.0, 1.0])], [torch.tensor([1.0, 1.0, 0.0])])[0]
    tensor([0., 2., 1.])

    Args:
        forget_weight: γ, the weight of the (projected) forget gradient.
        retain_weight: α, the weight of the retain gradient.
        eps: added to ``‖g_r^j‖²`` in the projection coefficient (the reference value 1e-10).
    """

    granularity: ClassVar[Granularity] = "tensor"
    retain_guarantee: ClassVar[RetainGuarantee | None] = "tensor"

    def terms(self, forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor]:
        return dot32(forget, retain), dot32(retain, retain)

    def summarize(self, totals: Tensor) -> Any:
        dots, sq = totals.unbind(-1)
        return {
            "scales": _projected_scales(dots, sq, self.retain_weight, self.forget_weight, self.eps),
            "projected": dots < 0,
        }


class PCGradGlobal(_ProjectionBase):
    """Global asymmetric PCGrad: one projection coefficient for all trainable parameters.

    ``c = ⟨g_f, g_r⟩ / (‖g_r‖² + ε)`` over the concatenation of every tensor; if ``c < 0`` then
    ``g_f ← g_f − c g_r`` everywhere; ``u = α g_r + γ g_f``.

    Granularity: global. Guarantee: ``⟨u, g_r⟩ ≥ 0`` over the whole parameter vector (not per
    tensor).

    Example (α = γ = 1; the global dot product is ``-4 + 1 = -3`` and ``‖g_r‖² = 3``, so
    ``g_f ← g_f + g_r`` in *both* tensors, although the second one agrees with ``g_r``):

    >>> import torch
    >>> f = [torch.tensor([-4.0, 0.0]), torch.tensor([1.0])]
    >>> r = [torch.tensor([1.0, 1.0]), torch.tensor([1.0])]
    >>> [t.tolist() for t in PCGradGlobal()(f, r)]
    [[-2.0, 2.0], [3.0]]

    Args:
        forget_weight: γ, the weight of the (projected) forget gradient.
        retain_weight: α, the weight of the retain gradient.
        eps: added to ``‖g_r‖²`` in the projection coefficient (the reference value 1e-10).
    """

    granularity: ClassVar[Granularity] = "global"
    retain_guarantee: ClassVar[RetainGuarantee | None] = "global"

    def terms(self, forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor]:
        return dot32(forget, retain), dot32(retain, retain)

    def summarize(self, totals: Tensor) -> Any:
        dot, sq = totals.unbind(-1)
        return {
            "scales": _projected_scales(dot, sq, self.retain_weight, self.forget_weight, self.eps),
            "projected": dot < 0,
        }
