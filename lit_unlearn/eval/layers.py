"""Per-layer synthesis geometry over a run: running means and the layer × module-type heatmap.

The engine hands every diagnosed step's :class:`~lit_unlearn.synthesis.LayerGeometry` to the
callbacks. :class:`LayerGeometryMeans` averages it over the diagnosed steps (each step counts
once, as the run-level geometry summary does), survives a resume through its ``state_dict``,
and gives ``results.json`` its ``geometry.per_layer`` entry; :func:`layer_heatmap_figure` draws
the means of one quantity — cos(g_f, g_r), cos(u, g_r) or the sign-conflict fraction — as a
heatmap with blocks as rows and module types as columns.
"""

from __future__ import annotations

import math
from typing import Any

from lit_unlearn.synthesis.diagnostics import LAYER_KEYS, LayerGeometry

TITLES = {
    "grad_cosine": "cos(g_f, g_r)",
    "update_retain_cosine": "cos(u, g_r)",
    "conflict_fraction": "sign-conflict fraction",
}


class LayerGeometryMeans:
    """Means of the per-layer geometry over the diagnosed steps of a run.

    ``nan`` cells (a block without tensors of a type) stay ``None`` in the summary.
    """

    def __init__(self) -> None:
        self._reset([], [])

    def _reset(self, layers: list[str], types: list[str]) -> None:
        self.layers, self.types = layers, types
        self.steps: list[int] = []
        self.sums = {k: [[0.0] * len(types) for _ in layers] for k in LAYER_KEYS}
        self.layer_sums = {k: [0.0] * len(layers) for k in LAYER_KEYS}
        self.type_sums = {k: [0.0] * len(types) for k in LAYER_KEYS}

    def add(self, step: int, geometry: LayerGeometry) -> None:
        """Account for one diagnosed step (a step seen again, as after a resume, is ignored)."""
        if step in self.steps:
            return
        if not self.steps or (list(geometry.layers), list(geometry.types)) != (self.layers, self.types):
            self._reset(list(geometry.layers), list(geometry.types))  # first step, or another parameter set
        self.steps.append(step)
        for key in LAYER_KEYS:
            for row, values in zip(self.sums[key], geometry.cells[key]):
                for j, value in enumerate(values):
                    row[j] += value  # nan stays nan: the cell is absent on every step
            self.layer_sums[key] = [a + b for a, b in zip(self.layer_sums[key], geometry.by_layer[key])]
            self.type_sums[key] = [a + b for a, b in zip(self.type_sums[key], geometry.by_type[key])]

    def summary(self) -> dict[str, Any] | None:
        """``results.json``'s ``geometry.per_layer``: labels, the number of diagnosed steps, and per
        key the mean per cell (``[layer][type]``), per layer and per type; ``None`` before any step."""
        if not self.steps:
            return None
        n = len(self.steps)

        def mean(value: float) -> float | None:
            return None if math.isnan(value) else value / n

        return {
            "layers": list(self.layers),
            "types": list(self.types),
            "steps": n,
            "cells": {k: [[mean(v) for v in row] for row in self.sums[k]] for k in LAYER_KEYS},
            "by_layer": {k: [mean(v) for v in self.layer_sums[k]] for k in LAYER_KEYS},
            "by_type": {k: [mean(v) for v in self.type_sums[k]] for k in LAYER_KEYS},
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return {
            "layers": self.layers,
            "types": self.types,
            "steps": self.steps,
            "sums": self.sums,
            "layer_sums": self.layer_sums,
            "type_sums": self.type_sums,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (an empty dict leaves the means empty)."""
        self._reset([], [])
        for key in ("layers", "types", "steps", "sums", "layer_sums", "type_sums"):
            if key in state:
                setattr(self, key, state[key])


def layer_heatmap_figure(summary: dict[str, Any], key: str, title: str = "") -> Any:
    """Matplotlib figure of one quantity (a key of :data:`LAYER_KEYS`) of a
    :meth:`LayerGeometryMeans.summary`: blocks top to bottom, module types left to right, values
    written in the cells while they fit. One figure per quantity keeps each TensorBoard card
    readable at its default width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, types = summary["layers"], summary["types"]
    height = min(1.6 + 0.3 * len(layers), 14.0)
    fig, ax = plt.subplots(figsize=(1.9 + 0.5 * len(types), height), dpi=100)
    values = np.array(
        [[np.nan if v is None else v for v in row] for row in summary["cells"][key]], dtype=float
    )
    cosine = key != "conflict_fraction"
    image = ax.imshow(
        np.ma.masked_invalid(values),
        # grey: no tensor of that type in that block; conflict 0.5 (independent signs) is white
        cmap=plt.get_cmap("RdBu" if cosine else "PuOr_r").with_extremes(bad="#dddddd"),
        vmin=-1.0 if cosine else 0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 24 else 8)
    ax.set_ylabel("block", fontsize=8)
    if len(layers) <= 16 and len(types) <= 12:
        for i in range(len(layers)):
            for j in range(len(types)):
                if not np.isnan(values[i, j]):
                    dark = abs(values[i, j]) > 0.6 if cosine else abs(values[i, j] - 0.5) > 0.3
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    steps = summary.get("steps", 0)
    ax.set_title(
        (title + ": " if title else "") + f"{TITLES[key]}, mean of {steps} step" + ("" if steps == 1 else "s"),
        fontsize=9,
    )  # fmt: skip
    fig.tight_layout()
    return fig
