"""scripts/sweep.py composes blocks for any benchmark and resumes a sweep where it stopped."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

from tests.integration.cli_helpers import ENV, ROOT

SWEEP = [sys.executable, os.path.join(ROOT, "scripts", "sweep.py")]


def test_sweep_dry_run_composes_any_benchmark_without_code_edits(tmp_path):
    out = subprocess.run(
        SWEEP
        + ["--benchmark", "wmdp_cyber", "--config", "configs/experiments/wmdp_cyber/npo_sago.yaml"]
        + [
            "--synthesizers",
            "naive",
            "configs/synthesizer/sago.yaml",
            "--lrs",
            "1e-5",
            "2e-5",
            "--seeds",
            "0",
            "1",
        ]
        + ["--out", str(tmp_path), "--dry-run", "--", "--config", "configs/trainer/gpu_ddp.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 * 2 * 2
    assert all(
        "configs/benchmark/wmdp_cyber.yaml" in c and "--config configs/trainer/gpu_ddp.yaml" in c
        for c in commands
    )
    assert sum("--model.synthesizer configs/synthesizer/naive.yaml" in c for c in commands) == 4
    assert any(f"save_dir {tmp_path}" in c and "version sago/lr2e-05_seed1" in c for c in commands)


def test_sweep_runs_then_skips_finished_runs(tmp_path):
    args = SWEEP + [
        "--benchmark",
        "configs/debug/tiny.yaml",
        "--synthesizers",
        "naive",
        "sago",
        "--lrs",
        "1e-3",
    ]
    args += ["--out", str(tmp_path), "--", "--trainer.max_steps", "2", "--export.enabled", "false"]
    first = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(glob.glob(os.path.join(tmp_path, "*", "lr0.001_seed0", "results.json"))) == 2
    again = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("# done already") == 2


def test_prepare_rwku_keeps_every_field_the_protocols_need(tmp_path, monkeypatch):
    """The hub is replaced by records in RWKU's published schema; level-3 ``type`` survives and the
    membership-inference subsets are written."""
    import json

    from tests.integration.cli_helpers import load_script

    module = load_script("prepare_data")
    targets = [{"target": f"T{i}"} for i in range(200)]
    probe = {"query": "q", "answer": "a", "subject": "T0"}
    hub = {
        "forget_target": targets,
        "train_original_passage": [
            {"text": "about T0", "subject": "T0"},
            {"text": "about T150", "subject": "T150"},
        ],
        "forget_level1": [{**probe, "level": "1"}, {**probe, "subject": "T99", "level": "1"}],
        "forget_level2": [{**probe, "level": "2"}],
        "forget_level3": [{**probe, "level": "3", "type": "affirmative suffix"}],
        "neighbor_level1": [{**probe, "level": "1"}],
        "neighbor_level2": [{**probe, "level": "2"}],
        "mia_forget": [{"text": "T0 was born", "subject": "T0"}],
        "mia_retain": [{"text": "T0 is known", "subject": "T0"}],
    }
    monkeypatch.setattr(module, "_load", lambda name, config, split="train": hub[config])
    module.prepare_rwku(str(tmp_path))
    level3 = json.load(open(tmp_path / "eval" / "forget_level3.json"))
    assert level3 == [
        {"query": "q", "answer": "a", "subject": "T0", "level": "3", "type": "affirmative suffix"}
    ]
    assert len(json.load(open(tmp_path / "eval" / "forget_level1.json"))) == 1  # T99 is not a forget target
    assert json.load(open(tmp_path / "eval" / "mia_forget.json")) == [
        {"text": "T0 was born", "subject": "T0"}
    ]
    assert (tmp_path / "retain_targets_151-200.jsonl").read_text().strip() == json.dumps(
        {"text": "about T150"}
    )


def _study():
    from tests.integration.cli_helpers import load_script

    return load_script("study_rules")


def _result(retain, forget=0.2, matched=True, step=40, cos=(0.1, 0.3)):
    at = {"step": step, "forget_qa": forget, "retain_qa": retain, "general_arithmetic": 0.9}
    grid = {
        "layers": ["0", "no layer"],
        "types": ["q", "lm_head"],
        "cells": {"update_retain_cosine": [[cos[0], None], [None, cos[1]]]},
        "by_type": {k: [0.5, 0.6] for k in ("conflict_fraction", "grad_cosine", "update_retain_cosine")},
    }
    geometry = {"min_update_retain_cosine": cos[0], "mean_update_retain_cosine": cos[1], "per_layer": grid}
    return {"matched": at if matched else None, "final": at, "geometry": geometry, "synthesizer": "x"}


def test_study_picks_the_rate_that_keeps_most_at_matched_forgetting():
    study = _study()
    runs = {5e-4: _result(0.9, forget=0.5, matched=False), 1e-3: _result(0.7), 2e-3: _result(0.8)}
    assert study.choose_lr(runs) == (2e-3, True)  # 5e-4 kept more but never reached the target
    never = {5e-4: _result(0.9, forget=0.6, matched=False), 1e-3: _result(0.8, forget=0.3, matched=False)}
    assert study.choose_lr(never) == (1e-3, False)  # none matched: the rate that forgot most


def test_study_summary_and_tables_report_the_spread_and_the_weakest_cell():
    study = _study()
    summary = study.summarise([_result(0.7, cos=(-0.2, 0.3)), _result(0.9, matched=False, step=200)])
    assert summary["matched"] == 1 and summary["seeds"] == 2
    assert summary["retain_qa"][0] == 0.8 and abs(summary["retain_qa"][1] - 0.1414) < 1e-3
    assert summary["min_cos_u_gr"] == -0.2 and summary["weakest_cell"] == "0/q"
    markdown = study.tables(
        {
            "objectives": {
                "graddiff": {"sago": {"name": "SAGO", "lr": 1e-3, "lr_matched": True, "summary": summary}}
            }
        }
    )
    assert "| SAGO | 0.001 | 1/2 | 120 ± 113 | 0.200 ± 0.000 | 0.800 ± 0.141 |" in markdown
    assert (
        "0/q (-0.05)" in markdown
    )  # the cell mean over both seeds and "| SAGO | 0.500 | 0.600 |" in markdown


def test_study_runs_are_valid_lit_unlearn_commands(tmp_path):
    from lit_unlearn.cli import parse_run_config

    study = _study()
    args = study.fit_args(str(tmp_path / "select" / "gru" / "lr0.001_seed100"), "npo", "gru", 1e-3, 100)
    assert args[:3] == ["fit", "--config", study.BENCHMARK]
    config = parse_run_config([study.BENCHMARK], args[3:])
    assert config.model.synthesizer.class_path == "lit_unlearn.synthesis.GRU"
    assert config.model.forget_objective.class_path == "lit_unlearn.objectives.NPO"
    assert config.model.diagnostics_every_n_steps == 1 and config.seed_everything == 100
    assert config.model.optimizer.init_args.lr == 1e-3
