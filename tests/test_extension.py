"""Extending lit_unlearn needs no edit of the package: a user's module with a synthesizer and an
objective (tests/examples/my_unlearning.py), two component files, and the real CLI."""

from __future__ import annotations

import glob
import json
import os

import torch

from tests.integration.cli_helpers import ENV, ROOT, TINY, run

EXAMPLES = os.path.join(ROOT, "tests", "examples")


def fit_with_examples(tmp_path, *args: str, steps: int, log_every: int) -> str:
    """``lit-unlearn fit`` on the tiny config with ``tests/examples`` importable (as a user's own
    package would be); returns the run's results.json."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join([EXAMPLES, ENV.get("PYTHONPATH", "")])}
    proc = run(
        "lit-unlearn",
        "fit",
        "--config",
        TINY,
        *args,
        "--trainer.max_steps",
        str(steps),
        "--trainer.log_every_n_steps",
        str(log_every),
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = glob.glob(str(tmp_path / "runs" / "**" / "results.json"), recursive=True)
    return results


def test_a_rule_and_an_objective_from_outside_the_package_run_through_the_cli(tmp_path):
    from tests.examples.my_unlearning import BoundedForget

    forget, retain = torch.tensor([3.0, -1.0, 0.5]), torch.tensor([1.0, 2.0, -2.0])
    (u,) = BoundedForget(retain_weight=1.0)([forget], [retain])
    assert torch.equal(u, torch.tensor([2.0, 1.0, -1.5]))

    rule = tmp_path / "bounded.yaml"
    rule.write_text("class_path: my_unlearning.BoundedForget\ninit_args: {retain_weight: 0.5}\n")
    objective = tmp_path / "known.yaml"
    objective.write_text("class_path: my_unlearning.KnownTokenAscent\ninit_args: {threshold: 3.0}\n")
    results = fit_with_examples(
        tmp_path,
        "--model.synthesizer",
        str(rule),
        "--model.forget_objective",
        str(objective),
        steps=4,
        log_every=2,
    )
    report = json.load(open(results))
    assert report["synthesizer"]["class_path"] == "my_unlearning.BoundedForget"
    assert report["synthesizer"]["init_args"]["retain_weight"] == 0.5
    assert report["forget_objective"]["class_path"] == "my_unlearning.KnownTokenAscent"
    assert "BoundedForget_KnownTokenAscent+NLL" in results  # the run directory names the method
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.dirname(results))
    events.Reload()
    kept = [e.value for e in events.Scalars("train/forget_kept")]  # the objective's own metric
    assert len(kept) == 2 and all(0.0 <= k <= 1.0 for k in kept)


def test_a_rule_written_as_one_combine_method_runs_through_the_cli(tmp_path):
    """tests/examples/new_rule.py: no kernel, no scratch buffers, no statistics; the base class
    chunks ``combine`` and writes the update into ``.grad``."""
    from tests.examples.new_rule import CappedConflict

    source = open(os.path.join(EXAMPLES, "new_rule.py")).read()
    body = source[source.index("class CappedConflict") :].strip().splitlines()
    assert len(body) <= 15
    (u,) = CappedConflict(forget_weight=2.0)(
        [torch.tensor([-3.0, 1.0, 0.5])], [torch.tensor([1.0, 2.0, 0.0])]
    )
    assert torch.equal(u, torch.tensor([0.0, 4.0, 1.0]))  # capped, summed, forget alone where g_r = 0
    results = fit_with_examples(
        tmp_path,
        "--model.synthesizer",
        "new_rule.CappedConflict",
        "--model.synthesizer.forget_weight",
        "2.0",
        steps=3,
        log_every=1,
    )
    report = json.load(open(results))
    assert report["synthesizer"] == {
        "class_path": "new_rule.CappedConflict",
        "init_args": {"forget_weight": 2.0, "retain_weight": 1.0},
    }
    assert report["steps"] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.dirname(results))
    events.Reload()
    # the update the rule wrote never opposes the retain gradient, step by step
    assert [e.value >= 0 for e in events.Scalars("train/update_retain_cosine")] == [True] * 3
