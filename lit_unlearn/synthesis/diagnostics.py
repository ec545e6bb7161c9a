"""Gradient geometry of one synthesis step: what users plot to understand a run.

All sums are accumulated in float32, one 0-dim tensor per quantity, with no host
synchronisation; the caller decides when to read them (the engine logs them every
``log_every_n_steps``).

Per-layer geometry: :class:`LayerGrid` sorts the trainable tensors by block index and module
type from their parameter names (an adapter's tensors count under the module they adapt), and
:class:`GeometryAccumulator` then also sums its per-tensor rows per grid cell, reduced in the same
single collective as the totals; :func:`layer_cosines` turns those sums into cos(g_f, g_r),
cos(u, g_r) and the conflict fraction of every cell, of every layer and of every module type.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

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


MODULE_TYPES = (
    "embedding",
    "q",
    "k",
    "v",
    "qkv",
    "o",
    "gate",
    "up",
    "gate_up",
    "down",
    "norm",
    "lm_head",
    "other",
)
"""Module types of the per-layer grid, in column order (only those a model has are shown)."""

NO_LAYER = "no layer"
"""Row label of the tensors outside the numbered blocks (embeddings, final norm, output head)."""

# A parameter name's components that name its module type (Llama/Mistral/Qwen/Gemma, GPT-2,
# GPT-NeoX, Phi, OPT, Falcon, Mixtral experts). Ambiguous projections (GPT-2's ``c_proj``,
# GPT-NeoX's ``dense``) are told apart by the attention or MLP component above them.
_COMPONENT_TYPES = {
    **dict.fromkeys(
        ("embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "embed_positions"), "embedding"
    ),
    **dict.fromkeys(("lm_head", "embed_out"), "lm_head"),
    **dict.fromkeys(("q_proj", "query", "q"), "q"),
    **dict.fromkeys(("k_proj", "key", "k"), "k"),
    **dict.fromkeys(("v_proj", "value", "v"), "v"),
    **dict.fromkeys(("qkv_proj", "c_attn", "query_key_value", "Wqkv"), "qkv"),
    **dict.fromkeys(("o_proj", "out_proj"), "o"),
    **dict.fromkeys(("gate_proj", "w1"), "gate"),
    **dict.fromkeys(("up_proj", "c_fc", "dense_h_to_4h", "fc1", "w3"), "up"),
    **dict.fromkeys(("gate_up_proj",), "gate_up"),
    **dict.fromkeys(("down_proj", "dense_4h_to_h", "fc2", "w2"), "down"),
}
_AMBIGUOUS = ("c_proj", "dense")  # output of attention, or of the MLP


def module_type(name: str) -> str:
    """The module type (one of :data:`MODULE_TYPES`) of a parameter, from its name: the last
    component that names a type, so ``...q_proj.lora_A.default.weight`` is ``q``.

    >>> module_type("model.layers.3.mlp.down_proj.weight"), module_type("transformer.h.0.attn.c_proj.weight")
    ('down', 'o')
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        if part in _COMPONENT_TYPES:
            return _COMPONENT_TYPES[part]
        if part in _AMBIGUOUS:
            above = " ".join(parts[:i]).lower()
            return "o" if "attn" in above or "attention" in above else "down"
        low = part.lower()
        if "norm" in low or low.startswith("ln"):
            return "norm"
    return "other"


def layer_of(name: str) -> int | None:
    """The block index of a parameter (the first all-digit component of its name), or ``None``."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class LayerGrid:
    """Which cell (block × module type) each trainable tensor belongs to.

    Args:
        layers: row labels: block indices in order, then :data:`NO_LAYER` if any tensor has none.
        types: column labels, the types present in :data:`MODULE_TYPES` order.
        cells: for tensor ``j``, its flat cell index ``row * len(types) + column``.
    """

    layers: tuple[str, ...]
    types: tuple[str, ...]
    cells: tuple[int, ...]
    _on_device: dict[torch.device, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> LayerGrid:
        """The grid of parameters named ``names`` (in the order the synthesizer sees them)."""
        found = [(layer_of(n), module_type(n)) for n in names]
        blocks = sorted({layer for layer, _ in found if layer is not None})
        layers = [str(b) for b in blocks] + ([NO_LAYER] if any(layer is None for layer, _ in found) else [])
        types = [t for t in MODULE_TYPES if any(kind == t for _, kind in found)]
        row = {b: i for i, b in enumerate(blocks)}
        cells = tuple(
            (row[layer] if layer is not None else len(blocks)) * len(types) + types.index(kind)
            for layer, kind in found
        )
        return cls(tuple(layers), tuple(types), cells)

    @property
    def size(self) -> int:
        """Number of cells."""
        return len(self.layers) * len(self.types)

    def index(self, device: torch.device) -> Tensor:
        """The cell index of every tensor as a long tensor on ``device`` (built once per device)."""
        if device not in self._on_device:
            self._on_device[device] = torch.tensor(self.cells, dtype=torch.long, device=device)
        return self._on_device[device]


LAYER_KEYS = ("grad_cosine", "update_retain_cosine", "conflict_fraction")
"""The per-layer quantities: cos(g_f, g_r), cos(u, g_r) and the sign-conflict fraction."""


def _from_sums(sums: Tensor) -> dict[str, Tensor]:
    """Cosines and conflict fraction from rows of the 8 accumulated sums (a cosine with a zero
    vector is 0, as in the totals)."""
    tiny = torch.finfo(sums.dtype).tiny
    ff, rr, uu = sums[..., 1].sqrt(), sums[..., 2].sqrt(), sums[..., 5].sqrt()
    return {
        "grad_cosine": sums[..., 0] / (ff * rr).clamp_min(tiny),
        "update_retain_cosine": sums[..., 3] / (uu * rr).clamp_min(tiny),
        "conflict_fraction": sums[..., 6] / sums[..., 7].clamp_min(1.0),
    }


def layer_cosines(sums: Tensor, grid: LayerGrid) -> dict[str, dict[str, Tensor]]:
    """Per-cell, per-layer and per-type geometry from a grid's reduced sums ``[cells, 8]``.

    Returns ``{"cells": {key: [layers, types]}, "layers": {key: [layers]}, "types": {key: [types]}}``
    for every key in :data:`LAYER_KEYS`; a cell without tensors is NaN. Layer and type values
    are those of the concatenated tensors (sums first, then the cosine), not means of cosines.
    """
    grid_sums = sums.reshape(len(grid.layers), len(grid.types), -1)
    present = torch.zeros(grid.size, dtype=torch.bool, device=sums.device)
    present[sorted(set(grid.cells))] = True
    mask = present.reshape(len(grid.layers), len(grid.types))
    cells = {k: torch.where(mask, v, float("nan")) for k, v in _from_sums(grid_sums).items()}
    return {"cells": cells, "layers": _from_sums(grid_sums.sum(1)), "types": _from_sums(grid_sums.sum(0))}


class GeometryAccumulator:
    """Streams ``(g_f^j, g_r^j, u^j)`` tensor by tensor and reduces the geometry once.

    Usable as the ``observer`` of :meth:`Synthesizer.__call__`, so diagnostics work even when the
    update overwrites the retain gradient in place.

    Args:
        reducer: sums float32 partial sums across shards (default: local).
        grid: also sum the per-tensor rows per block × module type (read :attr:`layer_sums`
            after :meth:`result`); its tensors must be the ones added, in order.
    """

    def __init__(self, reducer: Reducer | None = None, grid: LayerGrid | None = None) -> None:
        self.reducer = reducer if reducer is not None else local_sum
        self.grid = grid
        self._rows: list[Tensor] = []
        self.layer_sums: Tensor | None = None
        """After :meth:`result` with a grid: the reduced sums per cell, ``[cells, 8]`` float32."""

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
        n = per_tensor.shape[0]
        # One collective: the per-tensor dot products (for the tensor-level conflict count), the
        # column totals and the per-cell sums of the layer grid travel together.
        parts = [per_tensor[:, 0], per_tensor.sum(0)]
        grid = self.grid
        if grid is not None:
            if len(grid.cells) != n:
                raise ValueError(f"the layer grid describes {len(grid.cells)} tensors, {n} were added")
            cell_sums = per_tensor.new_zeros(grid.size, per_tensor.shape[1])
            parts.append(cell_sums.index_add_(0, grid.index(per_tensor.device), per_tensor).flatten())
        reduced = self.reducer(torch.cat(parts))
        tensor_dots, t = reduced[:n], reduced[n : n + 8]
        if grid is not None:
            self.layer_sums = reduced[n + 8 :].view(grid.size, 8)
        ff, rr, uu = t[1].sqrt(), t[2].sqrt(), t[5].sqrt()
        return {
            **_from_sums(t),  # cos(g_f, g_r), cos(u, g_r), conflict fraction: as for every grid cell
            "update_forget_cosine": t[4] / (uu * ff).clamp_min(torch.finfo(t.dtype).tiny),
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


@dataclass(frozen=True)
class LayerGeometry:
    """One diagnosed step's per-layer geometry on the host (from :func:`layer_geometry`).

    Args:
        layers: row labels (see :class:`LayerGrid`).
        types: column labels.
        cells: ``{key: [[value per type] per layer]}`` for :data:`LAYER_KEYS`; ``nan`` where a
            layer has no tensor of that type.
        by_layer: ``{key: [value per layer]}`` (all of a layer's tensors together).
        by_type: ``{key: [value per type]}`` (all tensors of a type together).
    """

    layers: tuple[str, ...]
    types: tuple[str, ...]
    cells: dict[str, list[list[float]]]
    by_layer: dict[str, list[float]]
    by_type: dict[str, list[float]]

    def scalars(self) -> dict[str, float]:
        """Scalar tags: ``per_layer/<key>/layer_NN`` (``.../no_layer`` for the tensors outside the
        blocks) and ``per_type/<key>/<type>``, for every key in :data:`LAYER_KEYS`."""
        width = max((len(label) for label in self.layers if label != NO_LAYER), default=1)
        rows = [
            "no_layer" if label == NO_LAYER else f"layer_{label.zfill(max(width, 2))}"
            for label in self.layers
        ]
        out: dict[str, float] = {}
        for key in LAYER_KEYS:
            out.update({f"per_layer/{key}/{row}": v for row, v in zip(rows, self.by_layer[key])})
            out.update({f"per_type/{key}/{kind}": v for kind, v in zip(self.types, self.by_type[key])})
        return out


def layer_geometry(sums: Tensor, grid: LayerGrid) -> LayerGeometry:
    """The host-side :class:`LayerGeometry` of reduced grid sums ``[cells, 8]`` (one transfer)."""
    values = layer_cosines(sums.detach().to("cpu", torch.float64), grid)
    return LayerGeometry(
        grid.layers,
        grid.types,
        {k: v.tolist() for k, v in values["cells"].items()},
        {k: v.tolist() for k, v in values["layers"].items()},
        {k: v.tolist() for k, v in values["types"].items()},
    )
