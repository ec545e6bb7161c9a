"""Membership inference: the four attack scores and the AUC on hand-worked examples; on the
synthetic target the forget documents are told apart from unseen ones before unlearning and less so
after, with the metric set running inside the evaluator during fit and in lit-unlearn-eval."""

from __future__ import annotations

import json
import math
import zlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_unlearn.data.sources import DataSourceError
from lit_unlearn.eval.mia import MembershipInference, SyntheticMembership, auc, score_texts


class Bigram(nn.Module):
    """Next-token logits = a fixed row per current token: hand-computable log-probabilities."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(rows).log())

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


class Letters:
    """Token 0 is BOS; 'a' -> 1, 'b' -> 2; BOS is not added by the tokenizer itself."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [{"a": 1, "b": 2}[c] for c in text]}


def test_attack_scores_by_hand():
    # p(.|BOS) = [.5, .25, .25], p(.|a) = [.25, .25, .5]; "ab" scores p(a|BOS) = 1/4, p(b|a) = 1/2
    model = Bigram([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    (scores,) = score_texts(model, Letters(), ["ab"], k=0.5)
    ln2 = math.log(2)
    assert scores["loss"] == pytest.approx(1.5 * ln2)  # -(ln 1/4 + ln 1/2) / 2
    assert scores["zlib"] == pytest.approx(1.5 * ln2 / len(zlib.compress(b"ab")))
    assert scores["mink"] == pytest.approx(2 * ln2)  # the lowest 50 % = 1 token: ln 4
    # both rows: mu = -1.5 ln2, sigma = ln2 / 2; z(1/4) = -1, z(1/2) = +1; the lowest is -1
    assert scores["minkpp"] == pytest.approx(1.0)
    (whole,) = score_texts(model, Letters(), ["ab"], k=1.0)
    assert whole["mink"] == pytest.approx(whole["loss"]) and whole["minkpp"] == pytest.approx(0.0, abs=1e-6)


def test_auc_by_hand():
    # pairs (member < non-member): (1,2) (1,4) (2,4) (3,4) win, (2,2) ties, (3,2) loses: 4.5 / 6
    assert auc([1.0, 2.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)
    assert auc([1.0], [1.0]) == 0.5 and math.isnan(auc([], [1.0]))


def test_bad_inputs_are_one_clear_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a b"}) + "\n")
    with pytest.raises(DataSourceError, match="empty.jsonl"):
        MembershipInference(str(empty), str(good)).setup(None, 64)
    with pytest.raises(DataSourceError, match="'text'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"body": "a b"}) + "\n")
        MembershipInference(str(bad), str(good)).setup(None, 64)
    with pytest.raises(ValueError, match="k must be"):
        MembershipInference(str(good), str(good), k=0.0)


def test_a_text_without_tokens_fails_at_setup_naming_it(tmp_path, smoke_target):
    from lit_unlearn.models import load_tokenizer

    forget, holdout = tmp_path / "forget.jsonl", tmp_path / "holdout.jsonl"
    forget.write_text(json.dumps({"text": "a b"}) + "\n")
    holdout.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataSourceError, match=r"forget_holdout text 1 \('   '\) has no token"):
        MembershipInference(str(forget), str(holdout)).setup(load_tokenizer(smoke_target), 64)


def test_files_and_synthetic_sets_agree(smoke_target, tmp_path):
    """The same texts through files (RWKU's schema) and the synthetic set give the same numbers;
    the trained-on forget documents are recognised (AUC near 1) against never-seen variants."""
    from transformers import AutoModelForCausalLM

    from lit_unlearn.models import load_tokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(smoke_target), load_tokenizer(smoke_target)
    synthetic = SyntheticMembership(num_people=20, max_texts=None)
    synthetic.setup(tok, 64)
    files = {}
    for name, texts in synthetic.texts().items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t, "subject": "x"}) + "\n" for t in texts))
    from_files = MembershipInference(str(files["forget"]), str(files["forget_holdout"]), str(files["retain"]))
    from_files.setup(tok, 64)
    a, b = synthetic.compute(model, tok), from_files.compute(model, tok)
    assert a == pytest.approx(b)
    assert a["forget_mia_loss"] < a["forget_holdout_mia_loss"] and a["forget_mia_loss_auc"] > 0.9
    assert set(a) == {
        f"{s}_mia_{x}"
        for s in ("forget", "forget_holdout", "retain")
        for x in ("loss", "zlib", "mink", "minkpp")
    } | {f"forget_mia_{x}_auc" for x in ("loss", "zlib", "mink", "minkpp")}


@pytest.mark.integration
def test_during_fit_and_after_with_lit_unlearn_eval(tmp_path):
    """Users add the metric set to the evaluator in a config file; after gradient ascent the forget
    documents are harder to tell from unseen ones; lit-unlearn-eval gives the same numbers on the
    saved model."""
    from tests.integration.cli_helpers import TINY, results, run, run_dirs

    config = tmp_path / "mia.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lit_unlearn.eval.UnlearningEvaluator\n"
        "      init_args:\n"
        "        every_n_steps: 10\n"
        "        monitor: forget_qa\n"
        "        metrics:\n"
        "          - class_path: lit_unlearn.eval.SyntheticProbes\n"
        "            init_args: {num_people: 20}\n"
        "          - class_path: lit_unlearn.eval.SyntheticMembership\n"
        "            init_args: {num_people: 20}\n"
    )
    args = ["fit", "--config", TINY, "--config", str(config), "--trainer.max_steps", "10"]
    args += ["--model.optimizer.init_args.lr", "0.01", "--trainer.default_root_dir", str(tmp_path / "runs")]
    proc = run("lit-unlearn", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(str(tmp_path / "runs"))
    before, after = results(run_dir)["history"][0], results(run_dir)["history"][-1]
    assert (before["step"], after["step"]) == (0, 10)
    assert after["forget_mia_loss"] > before["forget_mia_loss"]
    assert after["forget_mia_loss_auc"] < before["forget_mia_loss_auc"]
    metrics = "[{class_path: lit_unlearn.eval.SyntheticMembership, init_args: {num_people: 20}}]"
    out = tmp_path / "eval.json"
    proc = run(
        "lit-unlearn-eval",
        "--model",
        f"{run_dir}/unlearned_model",
        "--metrics",
        metrics,
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.load(open(out))["SyntheticMembership"]
    assert saved["forget_mia_loss_auc"] == pytest.approx(after["forget_mia_loss_auc"], abs=1e-6)
    assert saved["forget_mia_loss"] == pytest.approx(after["forget_mia_loss"], rel=1e-5)


def test_texts_are_scored_whole_and_non_finite_scores_are_left_out_and_counted(tmp_path):
    """Scores do not depend on the training max_length (RWKU scores whole texts); a text whose
    loss is NaN does not turn every mean into NaN, and is counted."""
    long_text = "ab" * 300  # 600 tokens + BOS, longer than the usual 512-token training cut
    (tmp_path / "forget.jsonl").write_text(
        json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "ba"}) + "\n"
    )
    (tmp_path / "holdout.jsonl").write_text(json.dumps({"text": "aab"}) + "\n")
    rows = [[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    model = Bigram(rows)
    mia = MembershipInference(str(tmp_path / "forget.jsonl"), holdout=str(tmp_path / "holdout.jsonl"))
    mia.setup(Letters(), max_length=64)
    out = mia.compute(model, Letters())
    (whole,) = score_texts(model, Letters(), [long_text])
    (ba,) = score_texts(model, Letters(), ["ba"])
    assert out["forget_mia_loss"] == pytest.approx((whole["loss"] + ba["loss"]) / 2)
    assert out["forget_mia_zlib"] == pytest.approx((whole["zlib"] + ba["zlib"]) / 2)
    assert "forget_mia_nonfinite" not in out

    class NaNAfterB(Bigram):  # every prediction made after a "b" is NaN
        def forward(self, input_ids):
            logits = self.table[input_ids].clone()
            logits[input_ids == 2] = float("nan")
            return SimpleNamespace(logits=logits)

    out = mia.compute(NaNAfterB(rows), Letters())
    assert out["forget_mia_nonfinite"] == 2.0  # "abab..." and "ba" both predict after a "b"
    assert math.isnan(out["forget_mia_loss"]) and math.isnan(out["forget_mia_loss_auc"])
    assert out["forget_holdout_mia_loss"] == pytest.approx(score_texts(model, Letters(), ["aab"])[0]["loss"])
