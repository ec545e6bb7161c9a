"""Run-level per-layer geometry: means over diagnosed steps, resume, and the heatmap."""

from __future__ import annotations

import math

import pytest

from lit_unlearn.eval.layers import LayerGeometryMeans, layer_heatmap_figure
from lit_unlearn.synthesis import LayerGeometry

NAN = math.nan


def _step(scale: float) -> LayerGeometry:
    cells = {
        "grad_cosine": [[-0.2 * scale, NAN], [0.1 * scale, 0.3 * scale]],
        "update_retain_cosine": [[0.5 * scale, NAN], [0.6 * scale, 0.7 * scale]],
        "conflict_fraction": [[0.4 * scale, NAN], [0.5 * scale, 0.2 * scale]],
    }
    by_layer = {k: [v[0][0], v[1][0]] for k, v in cells.items()}
    by_type = {k: [v[0][0], v[1][1]] for k, v in cells.items()}
    return LayerGeometry(("0", "no layer"), ("q", "lm_head"), cells, by_layer, by_type)


def test_means_over_diagnosed_steps_with_absent_cells_as_none():
    means = LayerGeometryMeans()
    assert means.summary() is None
    means.add(5, _step(1.0))
    means.add(10, _step(2.0))
    means.add(10, _step(9.0))  # the same step again (a resumed segment): not counted twice
    out = means.summary()
    assert out is not None
    assert out["steps"] == 2 and out["layers"] == ["0", "no layer"] and out["types"] == ["q", "lm_head"]
    assert out["cells"]["grad_cosine"][0][0] == pytest.approx(-0.3)
    assert out["cells"]["grad_cosine"][0][1] is None
    assert out["cells"]["conflict_fraction"][1][1] == pytest.approx(0.3)
    assert out["by_layer"]["update_retain_cosine"] == pytest.approx([0.75, 0.9])
    assert out["by_type"]["grad_cosine"] == pytest.approx([-0.3, 0.45])


def test_state_dict_round_trip_continues_the_means():
    a = LayerGeometryMeans()
    a.add(5, _step(1.0))
    b = LayerGeometryMeans()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.add(10, _step(3.0))
    assert a.summary() == b.summary()
    empty = LayerGeometryMeans()
    empty.load_state_dict({})  # a checkpoint from before per-layer geometry
    assert empty.summary() is None


@pytest.mark.parametrize("key", ["grad_cosine", "update_retain_cosine", "conflict_fraction"])
def test_heatmap_of_each_quantity_has_the_grid_labels_and_the_values(key):
    means = LayerGeometryMeans()
    means.add(5, _step(1.0))
    summary = means.summary()
    assert summary is not None
    fig = layer_heatmap_figure(summary, key, "GradDiff + SAGO")
    ax = fig.axes[0]
    assert ax.get_title().startswith("GradDiff + SAGO: ") and ax.get_title().endswith("mean of 1 step")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q", "lm_head"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "no layer"]
    written = [t.get_text() for t in ax.texts]
    assert sorted(written) == sorted(
        f"{v:.2f}" for row in summary["cells"][key] for v in row if v is not None
    )
