"""The relearning attack on the embedded benchmark: ``lit-unlearn-relearn`` fine-tunes an unlearned
model on the relearn slice of the forget people and tracks the held-out ones; curve in
results.json and TensorBoard; bad input is one line."""

from __future__ import annotations

import glob
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_unlearn.data.synthetic import SyntheticKnowledge, generate_corpus, select_people
from tests.conftest import SMOKE_PEOPLE
from tests.integration.cli_helpers import TINY, run, run_dirs

DATA = f"{{class_path: lit_unlearn.data.SyntheticKnowledge, init_args: {{part: forget, subset: relearn, num_people: {SMOKE_PEOPLE}, forget_fraction: 0.2}}}}"
HELD_OUT = f"[{{class_path: lit_unlearn.eval.SyntheticProbes, init_args: {{num_people: {SMOKE_PEOPLE}, forget_fraction: 0.2, forget_subset: held_out}}}}]"


def test_relearn_and_held_out_slices_split_the_people():
    people = generate_corpus(SMOKE_PEOPLE, 0.2).forget_people
    a, b = select_people(people, "relearn", 0.5), select_people(people, "held_out", 0.5)
    assert sorted(a + b) == sorted(people) and not set(a) & set(b) and len(a) == 2
    with pytest.raises(ValueError, match="relearn/held-out"):
        select_people(people[:1], "relearn", 0.5)
    assert "subset=relearn" in SyntheticKnowledge(subset="relearn").describe()


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


def _tok(path: str):
    from lit_unlearn.models import load_tokenizer

    return load_tokenizer(path)
