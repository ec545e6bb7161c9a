"""The relearning attack on the embedded benchmark: ``lit-unlearn-relearn`` fine-tunes an unlearned
model on the relearn slice of the forget people and tracks the held-out ones; curve in
results.json and TensorBoard; bad input is one line."""

from __future__ import annotations

import glob
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus, select_people
from lit_unlearn.benchmarks.synthetic.source import SyntheticKnowledge
from tests.conftest import SMOKE_PEOPLE
from tests.integration.cli_helpers import TINY, run, run_dirs

DATA = f"{{class_path: lit_unlearn.benchmarks.synthetic.SyntheticKnowledge, init_args: {{part: forget, subset: relearn, num_people: {SMOKE_PEOPLE}, forget_fraction: 0.2}}}}"
HELD_OUT = f"[{{class_path: lit_unlearn.eval.SyntheticProbes, init_args: {{num_people: {SMOKE_PEOPLE}, forget_fraction: 0.2, forget_subset: held_out}}}}]"


def test_relearn_and_held_out_slices_split_the_people():
    people = generate_corpus(SMOKE_PEOPLE, 0.2).forget_people
    a, b = select_people(people, "relearn", 0.5), select_people(people, "held_out", 0.5)
    assert sorted(a + b) == sorted(people) and not set(a) & set(b) and len(a) == 2
    with pytest.raises(ValueError, match="relearn/held-out"):
        select_people(people[:1], "relearn", 0.5)
    assert "subset=relearn" in SyntheticKnowledge(subset="relearn").describe()
    many = generate_corpus(200).forget_people  # 20 forget people: 10 attack, 5 + 5 held out
    val, test = (select_people(many, s, 0.5) for s in ("held_out_validation", "held_out_test"))
    assert sorted(val + test) == sorted(select_people(many, "held_out", 0.5)) and len(val) == len(test) == 5
    assert not set(val) & set(test)


def test_the_tuned_attack_picks_the_best_validation_point_of_any_learning_rate():
    from lit_unlearn.tools.relearn import _select

    curves = {
        "0.001": [{"step": 0, "v": 0.1}, {"step": 5, "v": 0.4}, {"step": 10, "v": 0.4}],
        "0.003": [{"step": 0, "v": 0.1}, {"step": 5, "v": 0.3}, {"step": 10, "v": 0.4}],
    }
    assert _select(curves, "v") == ("0.001", {"step": 5, "v": 0.4})  # ties: fewer steps, smaller lr
    curves["0.003"][2]["v"] = 0.5
    assert _select(curves, "v") == ("0.003", {"step": 10, "v": 0.5})
    assert _select({"0.001": curves["0.001"]}, None) == ("0.001", {"step": 10, "v": 0.4})  # last point


@pytest.mark.integration
def test_attack_after_unlearning_writes_the_recovery_curve(tmp_path, smoke_target):
    """Unlearn the smoke target's forget people (4 of 20) with gradient ascent, then attack with 2
    of them and watch the other 2."""
    forget = [
        "--data.forget.init_args.forget_fraction",
        "0.2",
        "--data.retain.init_args.forget_fraction",
        "0.2",
    ]
    fit = run(
        "lit-unlearn", "fit", "--config", TINY, *forget, "--trainer.max_steps", "15",
        "--model.optimizer.init_args.lr", "0.003", "--trainer.callbacks", "[]",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run_dir,) = run_dirs(str(tmp_path / "runs"))
    model = os.path.join(run_dir, "unlearned_model")
    out = tmp_path / "attack"
    args = ["--model", model, "--data", DATA, "--metrics", HELD_OUT, "--steps", "10", "--eval_every", "5"]
    attack = run("lit-unlearn-relearn", *args, "--out", str(out))
    assert attack.returncode == 0, attack.stderr[-3000:]
    report = json.load(open(out / "results.json"))
    assert [h["step"] for h in report["curve"]] == [0, 5, 10]
    relearn_slice = SyntheticKnowledge(subset="relearn", num_people=SMOKE_PEOPLE, forget_fraction=0.2)
    assert report["examples"] == len(relearn_slice.build(_tok(smoke_target), 64)) > 0  # 2 people's documents
    first, last = report["curve"][0], report["curve"][-1]
    assert report["recovery"]["forget_qa"] == pytest.approx(last["forget_qa"] - first["forget_qa"])
    events = EventAccumulator(glob.glob(str(out / "events.out.tfevents.*"))[0]).Reload()
    assert [e.step for e in events.Scalars("val/forget_qa")] == [0, 5, 10]
    assert len(events.Scalars("relearn/loss")) == 10
    # the same folder again: refused, nothing overwritten; a bad --data is one line
    again = run("lit-unlearn-relearn", *args, "--out", str(out))
    assert again.returncode != 0 and "already holds a relearning result" in again.stderr
    bad = run("lit-unlearn-relearn", "--model", model, "--data", "{class_path: lit_unlearn.data.QAPairs, init_args: {path: /nope.jsonl}}",
              "--metrics", HELD_OUT, "--out", str(tmp_path / "bad"))  # fmt: skip
    assert bad.returncode != 0 and "/nope.jsonl" in bad.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "bad" / "results.json")

    # the tuned attack: two learning rates, the point chosen on validation people, reported on test people
    probes = f"num_people: {SMOKE_PEOPLE}, forget_fraction: 0.2"
    split = (
        f"[{{class_path: lit_unlearn.eval.SyntheticProbes, init_args: {{{probes}, forget_subset: held_out_validation, forget_name: validation}}}},"
        f" {{class_path: lit_unlearn.eval.SyntheticProbes, init_args: {{{probes}, forget_subset: held_out_test, forget_name: test}}}}]"
    )
    tuned_out = tmp_path / "tuned"
    tuned = run(
        "lit-unlearn-relearn", "--model", model, "--data", DATA, "--metrics", split, "--steps", "10",
        "--eval_every", "5", "--lrs", "[0.0003, 0.003]", "--select_on", "validation_qa", "--out", str(tuned_out),
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    report = json.load(open(tuned_out / "results.json"))
    assert sorted(report["curves"]) == ["0.0003", "0.003"]
    points = [p for curve in report["curves"].values() for p in curve]
    assert report["selected"]["point"]["validation_qa"] == max(p["validation_qa"] for p in points)
    chosen = report["curves"][f"{report['selected']['lr']:g}"]
    assert report["recovery"]["test_qa"] == pytest.approx(
        report["selected"]["point"]["test_qa"] - chosen[0]["test_qa"]
    )
    assert {"validation_qa", "test_qa", "retain_qa"} <= set(points[0])
    for lr in ("0.0003", "0.003"):
        assert glob.glob(str(tuned_out / f"lr{lr}" / "events.out.tfevents.*"))


def _tok(path: str):
    from lit_unlearn.models import load_tokenizer

    return load_tokenizer(path)
