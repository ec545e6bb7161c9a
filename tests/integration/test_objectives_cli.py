"""Every forget objective open-unlearning users expect, through the real ``lit-unlearn fit`` on
the shipped tiny config and its component file: the run finishes and forgets."""

from __future__ import annotations

import os

import pytest

from tests.integration.cli_helpers import ROOT, results, run, run_dirs, tiny_fit


@pytest.mark.integration
@pytest.mark.parametrize(
    "name, cls", [("wga", "WGA"), ("satimp", "SatImp"), ("undial", "UNDIAL"), ("ceu", "CEU"), ("dpo", "DPO")]
)
def test_each_objective_forgets_through_the_cli(tmp_path, name, cls):
    component = os.path.join(ROOT, "configs", "objective", "forget", f"{name}.yaml")
    args = ["--model.forget_objective", component, "--trainer.max_steps", "10"]
    args += ["--model.optimizer.init_args.lr", "0.003"]
    proc = run("lit-unlearn", *tiny_fit(tmp_path, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(str(tmp_path))
    report = results(run_dir)
    assert cls in str(report["forget_objective"])
    history = report["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 10
    assert history[-1]["forget_qa"] <= history[0]["forget_qa"] - 0.3, history
