"""The lit-unlearn CLI end to end on the tiny debug config."""

from __future__ import annotations

import json
import os

import pytest

from lit_unlearn.cli import main
from tests.integration.cli_helpers import run_dirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "debug", "tiny.yaml")


def run_dir(root) -> str:
    """The newest run directory under ``root``."""
    return run_dirs(root)[-1]


def test_tiny_config_fit_leaves_model_logs_config_and_manifest(tmp_path, capsys):
    main(["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "6"])
    out = run_dir(tmp_path)
    files = set(os.listdir(out))
    assert {"config.yaml", "manifest.json", "unlearned_model"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert os.path.exists(os.path.join(out, "unlearned_model", "config.json"))
    assert os.path.exists(os.path.join(out, "unlearned_model", "tokenizer.json"))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["world_size"] == 1 and manifest["batch_size"]["forget"] == {
        "per_device": 8,
        "effective": 8,
    }
    assert manifest["versions"]["torch"] and manifest["seed"] == 0
    out = capsys.readouterr().out
    assert "unlearned model saved to" in out
    # the end-of-fit summary: steps and the three sides of the trade-off
    line = next(x for x in out.splitlines() if x.startswith("lit-unlearn: 6 optimizer steps; "))
    assert ("forgetting target forget_qa 0.2 not reached" in line) or ("matched point" in line)
    assert "retain_qa=" in out and "general_arithmetic=" in out


@pytest.mark.parametrize("rule", ["WeightedSum", "PCGrad", "PCGradGlobal", "SAGO", "SAGOPreferRetain"])
def test_synthesizer_swaps_by_flag(tmp_path, rule):
    main(
        [
            "fit",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "2",
            "--model.synthesizer",
            rule,
            "--export.enabled",
            "false",
        ]
    )
    config = open(os.path.join(run_dir(tmp_path), "config.yaml")).read()
    assert f"class_path: lit_unlearn.synthesis.{rule}" in config.replace(
        "synthesis.weighted.", "synthesis."
    ).replace("synthesis.projection.", "synthesis.").replace("synthesis.gating.", "synthesis.")


def test_print_config_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    out = capsys.readouterr().out
    for expected in (
        "class_path: lit_unlearn.synthesis.WeightedSum",
        "class_path: lit_unlearn.objectives.GradientAscent",
        "accumulate_grad_batches: 1",
        "grad_buffer_dtype: float32",
        "use_distributed_sampler: false",
    ):
        assert expected in out


@pytest.mark.parametrize(
    ("flag", "replacement"),
    [
        ("gradient_clip_val=1.0", "--model.gradient_clip_val"),
        ("accumulate_grad_batches=4", "--model.accumulate_grad_batches"),
    ],
)
def test_trainer_flags_refused_under_manual_optimization_name_the_module_flag(
    tmp_path, capsys, flag, replacement
):
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), f"--trainer.{flag}"])
    assert replacement in capsys.readouterr().err


def test_misspelt_synthesizer_fails_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--model.synthesizer", "SAGOO"])
    assert "SAGOO" in capsys.readouterr().err


def test_results_are_written_after_the_model_whatever_the_callback_order(tmp_path, capsys):
    """A config that lists TradeoffReport itself (as the benchmark files do) still writes
    results.json after unlearned_model/: a run stopped while saving has neither, and resumes in place."""
    overlay = tmp_path / "report_first.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: lit_unlearn.eval.TradeoffReport\n"
        "    - class_path: lit_unlearn.eval.UnlearningEvaluator\n"
        "      init_args: {metrics: [{class_path: lit_unlearn.eval.SyntheticProbes, init_args: {num_people: 20}}]}\n"
    )
    main(["fit", "--config", TINY, "--config", str(overlay), "--trainer.max_steps", "1",
          "--trainer.default_root_dir", str(tmp_path / "runs")])  # fmt: skip
    out = capsys.readouterr().out
    assert out.index("unlearned model saved to") < out.index("lit-unlearn: 1 optimizer step; ")


def test_fit_help_fits_in_700_lines():
    """What a user's ``lit-unlearn fit --help`` prints (in a fresh process: jsonargparse lists every
    imported Callback subclass, so test modules defining callbacks would inflate an in-process count)."""
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "lit_unlearn", "fit", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert len(out.splitlines()) <= 700
    assert "--model.network" in out and "--collapse_guard.threshold" in out
    assert "--trainer.accumulate_grad_batches" not in out  # refused under manual optimization


def test_the_progress_bar_names_the_run_instead_of_v_num():
    from types import SimpleNamespace

    from lit_unlearn.callbacks.progress import RunRichProgressBar, RunTQDMProgressBar

    logger = SimpleNamespace(version="SAGO_GradientAscent+NLL/lr0.001_seed0_abcd1234")
    trainer = SimpleNamespace(
        loggers=[logger], logger=logger, progress_bar_metrics={"train/forget_loss": 1.5}
    )
    for bar in (RunTQDMProgressBar(), RunRichProgressBar()):
        metrics = bar.get_metrics(trainer, None)
        assert metrics == {"run": "SAGO/lr0.001_seed0_abcd1234", "train/forget_loss": 1.5}
    # the demo's runs: an empty version under runs/demo/sago/seed0 -> the folder's tail
    logger = SimpleNamespace(version="", log_dir="runs/demo/sago/seed0/")
    trainer = SimpleNamespace(loggers=[logger], logger=logger, progress_bar_metrics={})
    assert RunRichProgressBar().get_metrics(trainer, None) == {"run": "sago/seed0"}
