"""TOFU: the helpers by hand, every metric of the set recomputed here item by item on a tiny model,
data-parallel halves equal one process, the retain reference in both formats, bad input, and the
local copy prepare_data.py writes."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from lit_unlearn.data.sources import DataSourceError
from lit_unlearn.errors import UserError
from lit_unlearn.eval.rwku import score_sago
from lit_unlearn.eval.tofu import (
    TOFU,
    answer_nll,
    closer_to_1_better,
    forget_quality,
    model_utility,
    read_retain_truth_ratios,
    true_better,
    truth_ratios,
)


def test_truth_ratio_and_its_aggregations_by_hand():
    # item 0: wrong answers NLL 1 and 3 (mean 2), correct 1: e^-2 / e^-1 = e^-1
    ratios = truth_ratios([1.0, 2.0], [[1.0, 3.0], [1.0, 1.0]])
    assert ratios == pytest.approx([math.exp(-1), math.exp(1)], rel=1e-8)
    assert closer_to_1_better(ratios) == pytest.approx(math.exp(-1), rel=1e-8)  # min(tr, 1/tr) = e^-1 twice
    assert true_better(ratios) == pytest.approx((1 - math.exp(-1) + 0) / 2, rel=1e-8)
    with pytest.raises(ValueError, match=r"expected wrong \[N, K\]"):
        truth_ratios([1.0, 2.0], [1.0, 2.0])


def test_forget_quality_is_the_two_sample_ks_p_value():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    retain = rng.normal(size=40)
    assert forget_quality(retain, retain) == pytest.approx(1.0)
    ps = []
    for shift in (0.0, 0.5, 1.0, 2.0):
        sample = rng.normal(loc=shift, size=40)
        p = forget_quality(sample, retain)
        assert p == ks_2samp(sample, retain).pvalue
        # the statistic scipy tests, by hand: the largest gap between the two empirical CDFs
        grid = np.concatenate([sample, retain])
        gap = max(abs((sample <= x).mean() - (retain <= x).mean()) for x in grid)
        assert gap == pytest.approx(ks_2samp(sample, retain).statistic)
        ps.append(p)
    assert ps[-1] < 1e-6 < ps[0]  # two normals 2 sd apart are told apart; the same one is not


def test_model_utility_is_the_harmonic_mean():
    from scipy.stats import hmean

    values = {"a": 0.5, "b": 0.25, "c": 1.0}
    assert model_utility(values) == pytest.approx(3 / (2 + 4 + 1))
    assert model_utility(values) == pytest.approx(hmean(list(values.values())))
    assert model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError):
        model_utility([0.5, float("nan")])


def _item(i: int, paraphrase: bool = True, wrong: int = 3) -> dict:
    words = ["the quick brown fox", "jumps over", "the lazy dog", "a brown dog", "over the fox"]
    item = {
        "question": f"What did author {i} write about {words[i % 5]}?",
        "answer": f"{words[(i + 1) % 5]} and {words[(i + 2) % 5]}" + " again" * (i % 3),
        "perturbed_answer": [f"{words[(i + k + 3) % 5]}" + " lazy" * k for k in range(wrong)],
    }
    if paraphrase:
        item["paraphrased_answer"] = f"{words[(i + 2) % 5]} then {words[(i + 1) % 5]}"
    return item


def write_tofu(directory, forget: int = 7, other: int = 5) -> str:
    os.makedirs(directory, exist_ok=True)
    splits = {
        "forget10_perturbed": [_item(i) for i in range(forget)],
        "retain_perturbed": [_item(100 + i) for i in range(other)],
        "real_authors_perturbed": [_item(200 + i, paraphrase=False) for i in range(other)],
        "world_facts_perturbed": [_item(300 + i, paraphrase=False) for i in range(other)],
    }
    for name, items in splits.items():
        with open(os.path.join(directory, f"{name}.json"), "w") as handle:
            json.dump(items, handle)
    return str(directory)


def _manual_nll(model, tok, question: str, answer: str) -> float:
    """One item alone, no padding: mean NLL of the answer's tokens after the raw prompt."""
    head = tok(f"Question: {question}\nAnswer:")["input_ids"]
    tail = tok(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    picked = logp[torch.arange(len(head) - 1, len(head) + len(tail) - 1), torch.tensor(tail)]
    return float(-picked.mean())


def test_answer_nll_in_padded_batches_equals_one_item_at_a_time(model, tok):
    items = [_item(i) for i in range(5)]
    prompts = [f"Question: {it['question']}\nAnswer:" for it in items]
    batched = answer_nll(model, tok, prompts, [it["answer"] for it in items], chat=False, batch_size=3)
    by_hand = [_manual_nll(model, tok, it["question"], it["answer"]) for it in items]
    assert batched == pytest.approx(by_hand, rel=1e-5)


def test_every_metric_equals_its_formula_item_by_item(model, tok, tmp_path):
    directory = write_tofu(tmp_path / "tofu")
    metric = TOFU(directory, max_new_tokens=4, batch_size=3, truth_ratios_path=str(tmp_path / "tr.json"))
    metric.setup(tok, 256)
    got = metric.compute(model, tok)
    expected = {}
    for split, name in (
        ("forget", "forget10_perturbed"),
        ("retain", "retain_perturbed"),
        ("real_authors", "real_authors_perturbed"),
        ("world_facts", "world_facts_perturbed"),
    ):
        items = json.load(open(os.path.join(directory, f"{name}.json")))
        nll = lambda a, it: _manual_nll(model, tok, it["question"], a)  # noqa: E731
        correct = np.array([nll(it["answer"], it) for it in items])
        wrong = np.array([[nll(w, it) for w in it["perturbed_answer"]] for it in items])
        if split in ("forget", "retain"):
            expected[f"{split}_qa_prob"] = np.mean(np.exp(-correct))
            para = np.array([nll(it["paraphrased_answer"], it) for it in items])
            tr = np.exp(-wrong.mean(1)) / (np.exp(-para) + 1e-10)
        else:
            p, q = np.exp(-correct), np.exp(-wrong).sum(1)
            expected[f"{split}_qa_prob"] = np.mean(p / (p + q + 1e-10))
            tr = np.exp(-wrong.mean(1)) / (np.exp(-correct) + 1e-10)
        if split == "forget":
            expected["forget_truth_ratio"] = np.mean(np.minimum(tr, 1 / tr))
            forget_tr = tr
        else:
            expected[f"{split}_truth_ratio"] = np.mean(np.maximum(0, 1 - tr))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4), key
    nine = [
        got[f"{s}_{m}"]
        for s in ("retain", "real_authors", "world_facts")
        for m in ("qa_prob", "qa_rougeL", "truth_ratio")
    ]
    assert got["model_utility"] == pytest.approx(model_utility(nine))
    assert all(0 <= got[f"{s}_qa_rougeL"] <= 1 for s in ("forget", "retain", "real_authors", "world_facts"))
    assert "forget_quality" not in got  # no retain reference given
    written = json.load(open(tmp_path / "tr.json"))
    assert written["truth_ratios"] == pytest.approx(forget_tr.tolist(), rel=1e-4)


def test_rouge_is_the_recall_of_the_greedy_answer(model, tok, tmp_path, monkeypatch):
    import lit_unlearn.eval.tofu as tofu

    answers = iter(["the lazy dog", "nothing at all"] * 20)
    monkeypatch.setattr(
        tofu, "greedy_generate", lambda m, t, prompts, *a, **k: [next(answers) for _ in prompts]
    )
    directory = write_tofu(tmp_path / "tofu", forget=2, other=2)
    metric = TOFU(directory, batch_size=8)
    metric.setup(tok, 256)
    got = metric.compute(model, tok)
    items = json.load(open(os.path.join(directory, "forget10_perturbed.json")))
    expected = (
        score_sago("the lazy dog", items[0]["answer"]) + score_sago("nothing at all", items[1]["answer"])
    ) / 2
    assert got["forget_qa_rougeL"] == pytest.approx(expected) and expected > 0


def test_forget_quality_against_a_retain_reference_in_both_formats(model, tok, tmp_path):
    directory = write_tofu(tmp_path / "tofu")
    ours = TOFU(directory, max_new_tokens=2, truth_ratios_path=str(tmp_path / "self.json"))
    ours.setup(tok, 256)
    ours.compute(model, tok)
    own = json.load(open(tmp_path / "self.json"))["truth_ratios"]
    # open-unlearning's evaluation JSON of a retain model, shifted ratios
    shifted = [r * 10 for r in own]
    (tmp_path / "ou.json").write_text(
        json.dumps(
            {
                "forget_truth_ratio": {
                    "agg_value": 0.5,
                    "value_by_index": {str(i): {"score": v} for i, v in enumerate(shifted)},
                }
            }
        )
    )
    assert read_retain_truth_ratios(str(tmp_path / "ou.json")) == pytest.approx(shifted)
    same = TOFU(directory, max_new_tokens=2, retain_truth_ratios=str(tmp_path / "self.json"))
    same.setup(tok, 256)
    assert same.compute(model, tok)["forget_quality"] == pytest.approx(1.0)  # the model against itself
    other = TOFU(directory, max_new_tokens=2, retain_truth_ratios=str(tmp_path / "ou.json"))
    other.setup(tok, 256)
    quality = other.compute(model, tok)["forget_quality"]
    assert quality == pytest.approx(forget_quality(own, shifted)) and quality < 0.01


def test_a_retain_model_given_as_a_path_is_scored_once(model, tok, tmp_path):
    model.save_pretrained(tmp_path / "retain_model")
    directory = write_tofu(tmp_path / "tofu")
    metric = TOFU(directory, max_new_tokens=2, retain_model=str(tmp_path / "retain_model"))
    metric.setup(tok, 256)
    assert metric.compute(model, tok)["forget_quality"] == pytest.approx(1.0)  # the same weights
    assert metric._reference is not None and len(metric._reference) == 7


@pytest.mark.parametrize("lockstep", [False, True])
def test_two_ranks_equal_one_process(model, tok, tmp_path, lockstep, monkeypatch):
    import lit_unlearn.eval.tofu as tofu
    from tests.eval.played_ranks import PlayedRanks, record_synced

    synced_flags = record_synced(monkeypatch, tofu)
    directory = write_tofu(tmp_path / "tofu")
    one = TOFU(directory, max_new_tokens=3, batch_size=2)
    one.setup(tok, 256)
    expected = one.compute(model, tok)
    played = PlayedRanks(lockstep)
    for rank in played.ORDER:
        metric = TOFU(directory, max_new_tokens=3, batch_size=2)
        metric.setup(tok, 256)
        got = metric.compute(model, tok, played.partition(rank))
    assert played.drained
    assert got == pytest.approx(expected, rel=1e-6)
    assert set(synced_flags) == {False} | ({True} if lockstep else set())


def test_bad_input_is_one_clear_error(tok, tmp_path):
    with pytest.raises(UserError, match="forget_split must be one of"):
        TOFU(str(tmp_path), forget_split="forget20")
    with pytest.raises(UserError, match="forget10_perturbed.json is missing.*prepare_data.py tofu"):
        TOFU(str(tmp_path)).setup(tok, 64)
    directory = write_tofu(tmp_path / "tofu")
    bad = json.load(open(os.path.join(directory, "world_facts_perturbed.json")))
    bad[1]["perturbed_answer"] = "just one string"
    json.dump(bad, open(os.path.join(directory, "world_facts_perturbed.json"), "w"))
    with pytest.raises(
        DataSourceError, match=r"world_facts_perturbed.json: record 1: 'perturbed_answer' must be"
    ):
        TOFU(directory).setup(tok, 64)
    directory = write_tofu(tmp_path / "tofu2")
    (tmp_path / "short.json").write_text(json.dumps([0.5, 0.7]))
    with pytest.raises(UserError, match=r"2 values for 7 forget10 items"):
        TOFU(directory, retain_truth_ratios=str(tmp_path / "short.json")).setup(tok, 64)
    with pytest.raises(UserError, match=r"TOFU retain_model: local path .*/no/model' does not exist"):
        TOFU(directory, retain_model=str(tmp_path / "no" / "model")).setup(tok, 64)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        read_retain_truth_ratios(str(tmp_path / "broken.json"))


def test_prepare_tofu_writes_every_split_with_its_fields(tmp_path, monkeypatch):
    from tests.integration.cli_helpers import load_script

    module = load_script("prepare_data")
    qa = {"question": "q", "answer": "a"}
    perturbed = {**qa, "paraphrased_answer": "p", "perturbed_answer": ["w1", "w2"]}
    hub = {config: [qa] for config in module.TOFU_TRAIN}
    hub.update({config: [perturbed] for config in module.TOFU_EVAL})
    hub["real_authors_perturbed"] = [{**qa, "perturbed_answer": ["w"], "option1": "x"}]
    monkeypatch.setattr(module, "_load", lambda name, config, split="train": hub[config])
    module.prepare_tofu(str(tmp_path))
    assert json.load(open(tmp_path / "forget10.json")) == [qa]
    assert json.load(open(tmp_path / "forget10_perturbed.json")) == [perturbed]
    assert json.load(open(tmp_path / "real_authors_perturbed.json"))[0]["option1"] == "x"  # every field kept
    assert sorted(os.listdir(tmp_path)) == sorted(f"{c}.json" for c in module.TOFU_TRAIN + module.TOFU_EVAL)
    hub["retain_perturbed"] = [{**qa, "perturbed_answer": ["w"]}]  # no paraphrase: a changed layout
    with pytest.raises(SystemExit, match=r"retain_perturbed has no \['paraphrased_answer'\]"):
        module.prepare_tofu(str(tmp_path / "again"))


@pytest.mark.integration
def test_the_tofu_evaluation_of_a_saved_model_through_lit_unlearn_eval(smoke_target, tmp_path):
    """``lit-unlearn-eval --metrics`` with the TOFU set gives the numbers of the set in-process."""
    from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus
    from tests.conftest import SMOKE_PEOPLE
    from tests.integration.cli_helpers import evaluated_through_cli, write_synthetic_tofu

    directory = write_synthetic_tofu(str(tmp_path / "tofu"), generate_corpus(SMOKE_PEOPLE))
    reported, expected = evaluated_through_cli(
        smoke_target, "TOFU", f"directory: {directory}, max_new_tokens: 5", str(tmp_path)
    )
    assert reported == pytest.approx(expected, rel=1e-6)
    assert max(v for k, v in reported.items() if k.endswith("rougeL")) > 0 and "model_utility" in reported


def test_the_embedded_benchmarks_tofu_view(smoke_target):
    """Forget = the forget people's questions, perturbed answers = other values of the attribute;
    the model against itself as the retain model has forget quality 1."""
    from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus
    from lit_unlearn.eval import SyntheticTOFU
    from lit_unlearn.models import load_causal_lm, load_tokenizer
    from tests.conftest import SMOKE_PEOPLE

    metric = SyntheticTOFU(num_people=SMOKE_PEOPLE, retain_model=smoke_target, max_items=40)
    tokenizer = load_tokenizer(smoke_target)
    metric.setup(tokenizer, 64)
    corpus = generate_corpus(SMOKE_PEOPLE)
    forget = corpus.probes_for("qa", corpus.forget_people)
    assert [it["question"] for it in metric._items["forget"]] == [p.prompt for p in forget][:40]
    for it in metric._items["forget"] + metric._items["world_facts"]:
        assert len(it["perturbed_answer"]) == 3 and it["answer"] not in it["perturbed_answer"]
    got = metric.compute(load_causal_lm(smoke_target), tokenizer)
    assert got["forget_quality"] == pytest.approx(1.0)
    # the smoke target knows its retain people: right answers far likelier than wrong ones
    assert got["retain_truth_ratio"] > 0.8 and got["retain_qa_rougeL"] > 0.8
