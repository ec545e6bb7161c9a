"""Cross-run comparison: seeds counted by value, mean ± std per method, the figure, the TensorBoard
run ``comparison/`` read back with EventAccumulator, and the end-of-fit summary lines."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_unlearn.eval.compare import (
    COMPARISON_RUN,
    compare_runs,
    load_results,
    method_summaries,
    run_rows,
    tradeoff_comparison_figure,
)
from lit_unlearn.eval.report import overshoot_warning, summary_lines
from tests.integration.cli_helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "compare_runs.py")


def results_of(synth: str, seed: int, retain: float, forget: float = 0.1, matched: bool = True) -> dict:
    history = [
        {"step": 0, "forget_qa": 0.9, "retain_qa": 0.99, "general_arithmetic": 0.2},
        {"step": 10, "forget_qa": 0.5, "retain_qa": (0.99 + retain) / 2, "general_arithmetic": 0.2},
        {"step": 20, "forget_qa": forget, "retain_qa": retain, "general_arithmetic": 0.19},
    ]
    return {
        "synthesizer": {"class_path": f"lit_unlearn.synthesis.{synth}", "init_args": {"forget_weight": 1.0}},
        "forget_objective": {"class_path": "lit_unlearn.objectives.GradientAscent", "init_args": {}},
        "retain_objective": {"class_path": "lit_unlearn.objectives.NLL", "init_args": {}},
        "optimizer": {"name": "AdamW", "lr": 0.001},
        "seed": seed,
        "forget_metric": "forget_qa",
        "retain_metric": "retain_qa",
        "target": {"monitor": "forget_qa", "value": 0.2, "mode": "below"},
        "matched_step": 20 if matched else None,
        "matched": history[-1] if matched else None,
        "final": history[-1],
        "history": history,
        "steps": 20,
        "wall_seconds": 3.0,
        "geometry": {"mean_update_retain_cosine": 0.5},
    }


def write_run(folder, name: str, results: dict) -> str:
    path = os.path.join(folder, name)
    os.makedirs(path)
    with open(os.path.join(path, "results.json"), "w") as handle:
        json.dump(results, handle)
    return path


@pytest.fixture
def demo_like(tmp_path):
    """Two methods, three and two seeds, a re-run of one seed (``seed0-2``), one seed unmatched."""
    folder = tmp_path / "demo"
    for seed, retain in zip((0, 1, 2), (0.95, 0.96, 0.97)):
        write_run(folder, f"sago/seed{seed}", results_of("SAGO", seed, retain))
    write_run(folder, "naive/seed0", results_of("WeightedSum", 0, 0.70))
    write_run(folder, "naive/seed1", results_of("WeightedSum", 1, 0.80, forget=0.3, matched=False))
    write_run(folder, "naive/seed0-2", results_of("WeightedSum", 0, 0.70))
    return str(folder)


def test_seeds_are_counted_by_value_and_a_repeated_seed_is_a_duplicate(demo_like, capsys):
    rows = run_rows(load_results([demo_like]), root=demo_like)
    by_run = {r["run"]: r for r in rows}
    assert by_run["naive/seed0-2"]["duplicate_of"] == "naive/seed0"
    assert all(r["duplicate_of"] is None for name, r in by_run.items() if name != "naive/seed0-2")
    sago, naive = sorted(method_summaries(rows), key=lambda m: m["method"])
    assert (sago["method"], sago["n"], sago["matched"], sago["duplicates"]) == ("SAGO", 3, 3, 0)
    assert (naive["method"], naive["n"], naive["matched"], naive["duplicates"]) == ("WeightedSum", 2, 1, 1)
    assert naive["seeds"] == [0, 1]
    assert sago["retain_mean"] == pytest.approx(0.96) and sago["retain_std"] == pytest.approx(0.01)
    assert naive["retain_mean"] == pytest.approx(0.75)
    assert naive["retain_std"] == pytest.approx(statistics.stdev([0.70, 0.80]))  # not ± 0 from a copy
    assert naive["forget_mean"] == pytest.approx(0.2)  # the unmatched seed counts at its last point


def test_the_tables_name_each_run_and_its_seed(demo_like, capsys):
    compare_runs([demo_like], write=False)
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["run", "seed", "method"]
    assert any(
        line.startswith("naive/seed0-2") and "duplicate of naive/seed0" in line for line in out.splitlines()
    )
    assert "0.960 ± 0.010" in out
    assert "1 run(s) repeat a seed" in out


def test_outputs_go_into_the_folder_and_tensorboard_shows_the_comparison(demo_like, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    oracle = {"forget_qa": 0.15, "retain_qa": 0.99}
    result = compare_runs([demo_like], oracle=oracle)
    assert os.listdir(elsewhere) == []  # nothing in the current directory
    assert sorted(os.listdir(demo_like)) == ["comparison", "comparison.json", "naive", "pareto.png", "sago"]
    with open(os.path.join(demo_like, "pareto.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(demo_like, "comparison.json")))
    assert saved["methods"] == json.loads(json.dumps(result["methods"]))
    assert saved["oracle"] == oracle

    run = os.path.join(demo_like, COMPARISON_RUN)
    ea = EventAccumulator(run, size_guidance={"images": 0, "tensors": 0}).Reload()
    assert set(ea.Tags()["images"]) == {"tradeoff/retain_vs_forget", "tradeoff/at_matched_forgetting"}
    for tag in ea.Tags()["images"]:
        (image,) = ea.Images(tag)
        assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 400
    texts = {t: ea.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in ea.Tags()["tensors"]}
    methods = texts["tradeoff/methods/text_summary"]
    assert "| SAGO | 3 | 3/3 |" in methods and "0.960 ± 0.010" in methods
    assert "| WeightedSum | 2 (+1 duplicate) | 1/2 |" in methods
    assert "naive/seed0-2" in texts["tradeoff/runs/text_summary"]

    compare_runs([demo_like], oracle=oracle)  # again: the comparison run is replaced, not stacked
    events = [n for n in os.listdir(run) if n.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert not [n for n in os.listdir(demo_like) if n.startswith(".")]  # no staging left behind


def test_the_figure_has_one_colour_and_one_legend_entry_per_method(demo_like):
    rows = run_rows(load_results([demo_like]), root=demo_like)
    methods = method_summaries(rows)
    fig = tradeoff_comparison_figure(rows, methods, oracle={"forget_qa": 0.15, "retain_qa": 0.99})
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert len(labels) == len(methods) + 2  # + the target line + the oracle
    assert sum(label.startswith("SAGO:") for label in labels) == 1
    assert any(label.startswith("target: forget_qa ≤ 0.2") for label in labels)
    assert "retrain oracle" in labels
    seed_lines = [line for line in ax.get_lines() if line.get_alpha() == 0.35]
    assert len(seed_lines) == 5  # every distinct seed's trajectory, not the duplicate
    assert len({line.get_color() for line in seed_lines}) == 2  # one colour per method
    marker = next(c for c in ax.containers if c.get_label().startswith("SAGO:"))
    (x,), (y,) = marker.lines[0].get_data()
    assert (x, y) == (pytest.approx(0.1), pytest.approx(0.96))


def test_compare_script_needs_only_the_folder(demo_like, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, SCRIPT, demo_like], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.exists(os.path.join(demo_like, "pareto.png")) and not os.listdir(cwd)
    # a Python without the project (here: no site-packages) gets one line saying what to do
    bare = subprocess.run(
        [sys.executable, "-I", "-S", SCRIPT, demo_like], capture_output=True, text=True, timeout=120
    )
    assert bare.returncode != 0 and "source .venv/bin/activate" in bare.stderr
    assert "Traceback" not in bare.stderr


def test_compare_script_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    from tests.integration.cli_helpers import load_script

    script = load_script("compare_runs")
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path / "nothing")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing: no such run directory" in err[0]


# ------------------------------------------------------------------------------ summary lines
def test_summary_names_the_matched_point_and_the_saved_model_apart():
    r = results_of("SAGO", 0, 0.9)
    r["history"][1]["forget_qa"] = 0.25  # the evaluation before the match was near the target
    r["matched"], r["matched_step"] = r["history"][1] | {"forget_qa": 0.18}, 10
    r["history"][1] = r["matched"]
    first, second = summary_lines(r)
    assert first.startswith(
        "lit-unlearn: 20 optimizer steps; matched point (step 10, first evaluation with forget_qa <= 0.2)"
    )
    assert "forget_qa=0.180" in first
    assert second.startswith(
        "lit-unlearn: saved model (step 20, unlearned_model/): forget_qa=0.100, retain_qa=0.900"
    )


def test_summary_when_the_saved_model_is_the_matched_point_or_the_target_was_missed():
    r = results_of("SAGO", 0, 0.9, forget=0.15)
    (line,) = summary_lines(r)
    assert "matched point = saved model (step 20, unlearned_model/)" in line
    missed = results_of("SAGO", 0, 0.9, forget=0.3, matched=False)
    lines = summary_lines(missed)
    assert "forgetting target forget_qa 0.2 not reached" in lines[0]
    assert lines[1].startswith("lit-unlearn: saved model (step 20")


def test_an_overshooting_matched_point_is_warned_about():
    r = results_of("SAGO", 0, 0.9, forget=0.0)  # 0.5 at step 10 -> 0.0 at step 20: 0.2 past 0.2
    warning = overshoot_warning(r)
    assert warning is not None and "0.500 (step 10) -> 0.000 (step 20)" in warning
    assert summary_lines(r)[-1].startswith("lit-unlearn: warning: the matched point overshot")
    assert overshoot_warning(results_of("SAGO", 0, 0.9, forget=0.15)) is None  # 0.05 past: fine
    above = results_of("SAGO", 0, 0.9)
    above["target"] = {"monitor": "retain_qa", "value": 0.5, "mode": "above"}
    above["matched"] = {"step": 20, "retain_qa": 0.8}  # 0.3 past 0.5 upwards
    assert overshoot_warning(above) is not None
