"""Gradient geometry of one synthesis step: what users plot to understand a run.

All sums are accumulated in float32, one 0-dim tensor per quantity, with no host
synchronisation; the caller decides when to read them (the engine logs them every
``log_every_n_steps``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_unlearn.synthesis.base import Reducer, dot32, local_sum

GEOMETRY_KEYS = (
    "grad_cosine",
    "conflict_fraction",
    "update_retain_cosine",
    "update_forget_cosine",
    "forget_norm",
    "retain_norm",
    "update_norm",
    "tensor_conflict_fraction",
)


class GeometryAccumulator:
    """Streams ``(g_f^j, g_r^j, u^j)`` tensor by tensor and reduces the geometry once.

    Usable as the ``observer`` of :meth:`Synthesizer.__call__`, so diagnostics work even when the
    update overwrites the retain gradient in place.

    Args:
        reducer: sums float32 partial sums across shards (default: local).
    """

    def __init__(self, reducer: Reducer | None = None) -> None:
        self.reducer = reducer if reducer is not None else local_sum
        self._rows: list[Tensor] = []

    def __call__(self, index: int, forget: Tensor, retain: Tensor, update: Tensor) -> None:
        self.add(forget, retain, update)

    def add(self, forget: Tensor, retain: Tensor, update: Tensor) -> None:
        """Account for one parameter tensor."""
        sign_product = torch.sign(forget).mul_(retain)
        both_nonzero = (forget != 0).logical_and_(retain != 0)
        self._rows.append(
            torch.stack(
                [
                    dot32(forget, retain),
                    dot32(forget, forget),
                    dot32(retain, retain),
                    dot32(update, retain),
                    dot32(update, forget),
                    dot32(update, update),
                    (sign_product < 0).sum().float(),
                    both_nonzero.sum().float(),
                ]
            )
        )

    def result(self) -> dict[str, Tensor]:
        """Reduce and return the geometry (0-dim float32 tensors keyed by :data:`GEOMETRY_KEYS`)."""
        if not self._rows:
            return {key: torch.tensor(float("nan")) for key in GEOMETRY_KEYS}
        per_tensor = torch.stack(self._rows)  # (n_tensors, 8)
        # One collective: the per-tensor dot products (for the tensor-level conflict count) and
        # the column totals travel together.
        reduced = self.reducer(torch.cat([per_tensor[:, 0], per_tensor.sum(0)]))
        n = per_tensor.shape[0]
        tensor_dots, t = reduced[:n], reduced[n:]
        ff, rr, uu = t[1].sqrt(), t[2].sqrt(), t[5].sqrt()
        tiny = torch.finfo(torch.float32).tiny

        def cosine(dot: Tensor, a: Tensor, b: Tensor) -> Tensor:
            return dot / (a * b).clamp_min(tiny)

        return {
            "grad_cosine": cosine(t[0], ff, rr),
            "conflict_fraction": t[6] / t[7].clamp_min(1.0),
            "update_retain_cosine": cosine(t[3], uu, rr),
            "update_forget_cosine": cosine(t[4], uu, ff),
            "forget_norm": ff,
            "retain_norm": rr,
            "update_norm": uu,
            "tensor_conflict_fraction": (tensor_dots < 0).float().mean(),
        }


def synthesis_diagnostics(
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    update: Sequence[Tensor],
    reducer: Reducer | None = None,
) -> dict[str, Tensor]:
    """Geometry of one step, from the forget gradient, the retain gradient and the update.

    Returns 0-dim float32 tensors: ``grad_cosine`` = cos(g_f, g_r); ``conflict_fraction`` = share of
    sign-disagreeing coordinates among those non-zero in both; ``update_retain_cosine`` =
    cos(u, g_r); ``update_forget_cosine`` = cos(u, g_f); ``forget_norm``, ``retain_norm``,
    ``update_norm``; ``tensor_conflict_fraction`` = share of tensors with ``⟨g_f^j, g_r^j⟩ < 0``,
    which is exactly the fraction of tensors module-wise :class:`PCGrad` projects. Cosines with a
    zero vector are 0.

    >>> import torch
    >>> g = synthesis_diagnostics([torch.tensor([1.0, -1.0, 0.0])], [torch.tensor([1.0, 1.0, 1.0])],
    ...                           [torch.tensor([1.0, 1.0, 1.0])])
    >>> round(g["conflict_fraction"].item(), 3), round(g["grad_cosine"].item(), 3)
    (0.5, 0.0)

    Args:
        forget: g_f, one tensor per parameter.
        retain: g_r, same shapes.
        update: u, same shapes.
        reducer: sums partial sums across shards (default: local).
    """
    if not (len(forget) == len(retain) == len(update)):
        raise ValueError(
            f"diagnostics need one tensor per parameter in each list, got {len(forget)}, {len(retain)}, {len(update)}"
        )
    acc = GeometryAccumulator(reducer)
    for j, (f, r, u) in enumerate(zip(forget, retain, update)):
        if not (f.shape == r.shape == u.shape):
            raise ValueError(
                f"tensor {j}: shapes differ: {tuple(f.shape)}, {tuple(r.shape)}, {tuple(u.shape)}"
            )
        acc.add(f, r, u)
    return acc.result()
