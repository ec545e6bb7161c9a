"""The naive rule: a weighted sum of the two task gradients."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lit_unlearn.synthesis.base import ChunkKernel, Granularity, RetainGuarantee, Synthesizer


class WeightedSum(Synthesizer):
    """Naive synthesis ``u = α g_r + γ g_f`` (the "naive" baseline of arXiv 2604.14808).

    Granularity: element. Guarantee: with ``α = γ = 1`` the update equals one backward pass of
    ``γ L_f + α L_r``; it makes no promise about the sign of ``⟨u, g_r⟩``.

    Example (γ = 1, α = 0.5):

    >>> import torch
    >>> rule = WeightedSum(forget_weight=1.0, retain_weight=0.5)
    >>> rule([torch.tensor([1.0, -2.0, 0.0])], [torch.tensor([2.0, 2.0, -4.0])])[0]
    tensor([ 2., -1., -2.])

    Args:
        forget_weight: γ, the weight of the forget gradient.
        retain_weight: α, the weight of the retain gradient.
    """

    granularity: ClassVar[Granularity] = "element"
    retain_guarantee: ClassVar[RetainGuarantee | None] = None

    def combine(self, forget: Tensor, retain: Tensor, stats: Any = None) -> Tensor:
        return self.retain_weight * retain + self.forget_weight * forget

    def fused_kernel(self, stats: Any) -> ChunkKernel:
        alpha, gamma = self.retain_weight, self.forget_weight

        def kernel(f: Tensor, r: Tensor, o: Tensor, a: Tensor, b: Tensor) -> None:
            torch.mul(r, alpha, out=b)
            torch.add(b, f, alpha=gamma, out=o)

        return kernel
