"""Per-layer geometry: parameter names to (block, module type), per-cell sums in the one
collective of the diagnostics, and the cosines of every cell, layer and type by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lit_unlearn.synthesis import GeometryAccumulator, LayerGrid, layer_geometry
from lit_unlearn.synthesis.diagnostics import NO_LAYER, layer_of, module_type


@pytest.mark.parametrize(
    "name, layer, kind",
    [
        ("model.embed_tokens.weight", None, "embedding"),
        ("model.layers.0.self_attn.q_proj.weight", 0, "q"),
        ("model.layers.12.self_attn.k_proj.weight", 12, "k"),
        ("model.layers.1.self_attn.v_proj.weight", 1, "v"),
        ("model.layers.1.self_attn.o_proj.weight", 1, "o"),
        ("model.layers.3.mlp.gate_proj.weight", 3, "gate"),
        ("model.layers.3.mlp.up_proj.weight", 3, "up"),
        ("model.layers.3.mlp.down_proj.weight", 3, "down"),
        ("model.layers.3.input_layernorm.weight", 3, "norm"),
        ("model.norm.weight", None, "norm"),
        ("lm_head.weight", None, "lm_head"),
        # adapters count under the module they adapt
        ("base_model.model.model.layers.5.self_attn.q_proj.lora_A.default.weight", 5, "q"),
        ("base_model.model.model.layers.5.mlp.down_proj.lora_B.default.weight", 5, "down"),
        # other families: fused projections, and GPT-2's / GPT-NeoX's ambiguous output projections
        ("transformer.h.2.attn.c_attn.weight", 2, "qkv"),
        ("transformer.h.2.attn.c_proj.weight", 2, "o"),
        ("transformer.h.2.mlp.c_proj.weight", 2, "down"),
        ("transformer.h.2.mlp.c_fc.weight", 2, "up"),
        ("transformer.ln_f.weight", None, "norm"),
        ("gpt_neox.layers.4.attention.dense.weight", 4, "o"),
        ("gpt_neox.layers.4.mlp.dense_4h_to_h.weight", 4, "down"),
        ("model.layers.0.mlp.gate_up_proj.weight", 0, "gate_up"),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", 0, "down"),
        ("model.layers.0.mlp.router.weight", 0, "other"),
    ],
)
def test_parameter_names_map_to_block_and_module_type(name, layer, kind):
    assert layer_of(name) == layer
    assert module_type(name) == kind


NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.self_attn.q_proj.bias",  # two tensors in one cell
    "model.norm.weight",
    "lm_head.weight",
]


def test_grid_rows_are_blocks_in_order_then_the_tensors_outside_them():
    grid = LayerGrid.from_names(list(reversed(NAMES)))
    assert grid.layers == ("0", "1", NO_LAYER)
    assert grid.types == ("embedding", "q", "down", "norm", "lm_head")  # present types, fixed order
    assert grid.size == 15
    # tensor j sits in cell row * 5 + column
    assert grid.cells == (2 * 5 + 4, 2 * 5 + 3, 1 * 5 + 1, 1 * 5 + 1, 0 * 5 + 2, 0 * 5 + 1, 2 * 5 + 0)


def _tensors(seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (4, 4), (3, 4), (4, 4), (4,), (4,), (6, 4)]
    forget = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    retain = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    update = [r + 0.3 * f for f, r in zip(forget, retain)]
    return forget, retain, update


def _cos(a, b):
    return (torch.dot(a, b) / (a.norm() * b.norm())).item()


def test_cells_layers_and_types_are_the_geometry_of_their_concatenated_tensors():
    grid = LayerGrid.from_names(NAMES)
    forget, retain, update = _tensors(0)
    calls = []

    def reducer(partial):
        calls.append(partial.numel())
        return partial

    acc = GeometryAccumulator(reducer, grid)
    for j, (f, r, u) in enumerate(zip(forget, retain, update)):
        acc(j, f, r, u)
    totals = acc.result()
    assert len(calls) == 1  # totals, per-tensor dots and the grid: one collective
    geo = layer_geometry(acc.layer_sums, grid)

    def flat(tensors, idx):
        return torch.cat([tensors[i].flatten() for i in idx])

    # cell (block 1, q) holds tensors 3 and 4: their concatenation, not a mean of two cosines
    row, col = grid.layers.index("1"), grid.types.index("q")
    want = _cos(flat(forget, [3, 4]), flat(retain, [3, 4]))
    assert geo.cells["grad_cosine"][row][col] == pytest.approx(want, rel=1e-6)
    f, r = flat(forget, [3, 4]), flat(retain, [3, 4])
    conflicts = ((f.sign() * r.sign()) < 0).sum().item() / ((f != 0) & (r != 0)).sum().item()
    assert geo.cells["conflict_fraction"][row][col] == pytest.approx(conflicts)
    assert geo.cells["update_retain_cosine"][row][col] == pytest.approx(
        _cos(flat(update, [3, 4]), r), rel=1e-6
    )
    # absent cells are nan; layer 0 = tensors 1 and 2; type q = tensors 1, 3 and 4
    assert math.isnan(geo.cells["grad_cosine"][row][grid.types.index("down")])
    assert geo.by_layer["grad_cosine"][0] == pytest.approx(_cos(flat(forget, [1, 2]), flat(retain, [1, 2])))
    assert geo.by_type["update_retain_cosine"][col] == pytest.approx(
        _cos(flat(update, [1, 3, 4]), flat(retain, [1, 3, 4]))
    )
    # all cells together are the whole vector: the run-level cosine
    everything = list(range(len(NAMES)))
    assert totals["grad_cosine"].item() == pytest.approx(
        _cos(flat(forget, everything), flat(retain, everything))
    )
    scalars = geo.scalars()
    assert scalars["per_layer/grad_cosine/layer_01"] == geo.by_layer["grad_cosine"][1]
    assert scalars["per_type/conflict_fraction/lm_head"] == geo.by_type["conflict_fraction"][-1]
    assert "per_layer/update_retain_cosine/no_layer" in scalars


def test_shards_summed_by_the_reducer_give_the_unsharded_grid():
    """Two ranks each holding half of every tensor (FSDP's dim-0 shards): the sum of their
    payloads (what the all-reduce computes) carries the whole tensors' grid sums."""
    grid = LayerGrid.from_names(NAMES)
    forget, retain, update = _tensors(1)
    whole = GeometryAccumulator(None, grid)
    for j, t in enumerate(zip(forget, retain, update)):
        whole(j, *t)
    whole.result()
    payloads: list[torch.Tensor] = []
    for rank in range(2):
        acc = GeometryAccumulator(lambda partial: payloads.append(partial) or partial, grid)
        for j, t in enumerate(zip(forget, retain, update)):
            acc(j, *(x.flatten().chunk(2)[rank] for x in t))
        acc.result()
    reduced, n = payloads[0] + payloads[1], len(NAMES)
    assert whole.layer_sums is not None
    assert torch.allclose(reduced[n + 8 :].view(grid.size, 8), whole.layer_sums)


def test_a_grid_for_other_tensors_is_refused():
    grid = LayerGrid.from_names(NAMES[:3])
    acc = GeometryAccumulator(None, grid)
    f, r, u = _tensors(0)
    acc(0, f[0], r[0], u[0])
    with pytest.raises(ValueError, match="describes 3 tensors, 1 were added"):
        acc.result()
