"""MUSE: PrivLeak and ROUGE-L F1 by hand, every metric of the set recomputed here item by item on a
tiny model (one-item generation, hand-built prompts, hand-computed Min-K%++ and AUC), the PrivLeak
reference in every form, data-parallel halves equal one process, bad input, and the local copy
prepare_data.py writes."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch

from lit_unlearn.data.sources import DataSourceError
from lit_unlearn.errors import UserError
from lit_unlearn.eval.muse import MUSE, knowmem_prompt, privleak, read_reference_auc, rouge_l_f1
from lit_unlearn.partition import Partition

WORDS = "the quick brown fox jumps over the lazy dog a brown dog over the fox again and then".split()


def test_privleak_by_hand_and_as_open_unlearning_writes_it():
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)  # the target: forget texts far more familiar
    assert privleak(0.5, 0.5) == 0.0  # leaks as little as the retain model
    assert privleak(0.2, 0.6) == pytest.approx((0.6 - 0.2) / 0.4 * 100)  # over-unlearned: positive
    for auc, ref in ((0.9, 0.55), (0.3, 0.45), (0.51, 0.49)):
        s, r = 1 - auc, 1 - ref  # open-unlearning's form on 1 - AUC
        assert privleak(auc, ref) == pytest.approx((s - r) / (r + 1e-10) * 100)


def test_rouge_l_f1_by_hand():
    # LCS of "the cat on mat" in "the cat sat on the mat" is 4 words: P = 4/4, R = 4/6, F = 0.8
    assert rouge_l_f1("the cat on mat", "the cat sat on the mat") == pytest.approx(0.8)
    assert rouge_l_f1("Cats running", "cat run") == pytest.approx(1.0)  # lower-cased and stemmed
    assert rouge_l_f1("", "the cat") == 0.0


def _text(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 7 + j * (i % 3 + 1)) % len(WORDS)] for j in range(length))


def write_muse(directory, items: int = 5, icl: int = 2, texts: int = 6) -> str:
    """The evaluation files in the layout prepare_data.py writes (published field names)."""
    os.makedirs(directory, exist_ok=True)
    qa = lambda offset, n: [  # noqa: E731
        {"question": f"What did {_text(offset + i, 3)} do?", "answer": _text(offset + i + 50, 2 + i % 3)}
        for i in range(n)
    ]
    files = {
        "verbmem_forget.json": [
            {"prompt": _text(i, 4 + i % 3), "gt": _text(i + 20, 6 + i % 4)} for i in range(items)
        ],
        "knowmem_forget_qa.json": qa(0, items),
        "knowmem_forget_qa_icl.json": qa(100, icl),
        "knowmem_retain_qa.json": qa(200, items),
        "knowmem_retain_qa_icl.json": qa(300, icl),
        "privleak_forget.json": [{"text": _text(i, 8 + 3 * i)} for i in range(texts)],
        "privleak_holdout.json": [
            {"text": " ".join(_text(i + 5, 9 + 2 * i).split()[::-1])} for i in range(texts)
        ],
        "privleak_retain.json": [{"text": _text(i + 80, 9)} for i in range(texts)],
    }
    for name, rows in files.items():
        with open(os.path.join(directory, name), "w") as handle:
            json.dump(rows, handle)
    return str(directory)


def _load(directory: str, name: str) -> list[dict]:
    return json.load(open(os.path.join(directory, name)))


def _greedy(model, tok, prompt: str, new_tokens: int, stops: list[str]) -> str:
    """One prompt alone (no padding), greedy, cut at EOS and at the first stop string, stripped."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )[0, ids.shape[1]:].tolist()  # fmt: skip
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    text = tok.decode(out, skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0] if stop in text else text
    return text.strip()


def _minkpp(model, tok, text: str, k: float, max_tokens: int) -> float:
    """Min-K%++ by hand: standardised log p of each token after BOS (first ``max_tokens``)."""
    ids = tok(text)["input_ids"]
    ids = ([tok.bos_token_id] if ids[0] != tok.bos_token_id else []) + ids
    ids = ids[: max_tokens + 1]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
    target = torch.tensor(ids[1:])
    picked = logp[torch.arange(len(target)), target]
    mu = (logp.exp() * logp).sum(-1)
    sigma = ((logp.exp() * logp * logp).sum(-1) - mu**2).sqrt()
    z = sorted(((picked - mu) / sigma).tolist())
    count = max(1, int(k * len(z)))
    return -sum(z[:count]) / count


def test_every_metric_equals_its_formula_item_by_item(model, tok, tmp_path):
    directory = write_muse(tmp_path / "muse")
    metric = MUSE(
        directory, retain_auc=0.6, verbmem_new_tokens=7, knowmem_new_tokens=5, verbmem_batch_size=2,
        knowmem_batch_size=3, max_tokens=12, outputs_path=str(tmp_path / "out.jsonl"),
    )  # fmt: skip
    metric.setup(tok, 256)
    got = metric.compute(model, tok)

    verbmem = _load(directory, "verbmem_forget.json")
    outputs = [_greedy(model, tok, r["prompt"], 7, []) for r in verbmem]
    expected = {"forget_verbmem_rougeL": sum(rouge_l_f1(o, r["gt"]) for o, r in zip(outputs, verbmem)) / 5}
    for split in ("forget", "retain"):
        shots = "".join(
            f"Question: {e['question']}\nAnswer: {e['answer']}\n\n"
            for e in _load(directory, f"knowmem_{split}_qa_icl.json")
        )
        items = _load(directory, f"knowmem_{split}_qa.json")
        answers = [
            _greedy(
                model,
                tok,
                f"{shots}Question: {it['question']}\nAnswer: ",
                5,
                ["\n\n", "\nQuestion", "Question:"],
            )
            for it in items
        ]
        expected[f"{split}_knowmem_rougeL"] = (
            sum(rouge_l_f1(a, it["answer"]) for a, it in zip(answers, items)) / 5
        )
    forget = [_minkpp(model, tok, r["text"], 0.4, 12) for r in _load(directory, "privleak_forget.json")]
    holdout = [_minkpp(model, tok, r["text"], 0.4, 12) for r in _load(directory, "privleak_holdout.json")]
    auc = sum((f < h) + 0.5 * (f == h) for f in forget for h in holdout) / (len(forget) * len(holdout))
    expected.update(privleak_auc=auc, privleak_reference_auc=0.6, privleak=(0.6 - auc) / 0.4 * 100)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert 0 < auc < 1 and len(set(forget + holdout)) == 12  # a real ranking, not ties
    assert all(outputs) and max(v for k, v in expected.items() if k.endswith("rougeL")) > 0

    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [r["task"] for r in rows] == ["forget_verbmem"] * 5 + ["forget_knowmem"] * 5 + [
        "retain_knowmem"
    ] * 5
    assert [r["output"] for r in rows[:5]] == outputs
    assert rows[5]["prompt"].startswith("Question: ") and rows[5]["prompt"].endswith("\nAnswer: ")


def test_the_texts_are_cut_to_max_tokens(model, tok, tmp_path):
    """PrivLeak scores the first ``max_tokens`` tokens (after BOS), as open-unlearning truncates."""
    directory = write_muse(tmp_path / "muse", texts=4)
    aucs = {}
    for cut in (6, 200):
        metric = MUSE(directory, retain_auc=0.5, verbmem_new_tokens=1, knowmem_new_tokens=1, max_tokens=cut)
        metric.setup(tok, 256)
        longest = max(len(ids) for ids in metric._mia._ids["forget"])
        assert longest == 7 if cut == 6 else longest > 20  # BOS + 6 tokens; whole texts
        aucs[cut] = metric._auc(model, tok, Partition())
    forget = [_minkpp(model, tok, r["text"], 0.4, 6) for r in _load(directory, "privleak_forget.json")]
    holdout = [_minkpp(model, tok, r["text"], 0.4, 6) for r in _load(directory, "privleak_holdout.json")]
    assert aucs[6] == pytest.approx(sum((f < h) + 0.5 * (f == h) for f in forget for h in holdout) / 16)


def test_knowmem_prompt_with_a_chat_template(tok):
    class Chat:
        chat_template = "set"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    examples = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": 7}]
    assert (
        knowmem_prompt(Chat(), examples, "q", chat=True)
        == "<user>q1<assistant>a1<user>q2<assistant>7<user>q<assistant>"
    )
    assert (
        knowmem_prompt(tok, examples, "q", chat=False)
        == "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer: 7\n\nQuestion: q\nAnswer: "
    )


def test_the_privleak_reference_in_every_form(model, tok, tmp_path, caplog):
    directory = write_muse(tmp_path / "muse", items=2, texts=4)
    fast = dict(verbmem_new_tokens=1, knowmem_new_tokens=1)

    def run(**reference):
        metric = MUSE(directory, **fast, **reference)
        metric.setup(tok, 256)
        return metric.compute(model, tok)

    model.save_pretrained(tmp_path / "retain_model")
    same = run(retain_model=str(tmp_path / "retain_model"))  # the same weights: no leak at all
    assert same["privleak_reference_auc"] == pytest.approx(same["privleak_auc"]) and same[
        "privleak"
    ] == pytest.approx(0)
    auc = same["privleak_auc"]
    (tmp_path / "ou.json").write_text(
        json.dumps({"mia_min_k_plus_plus": {"agg_value": 0.25}, "mia_min_k": {"agg_value": 0.75}})
    )
    assert run(retain_logs=str(tmp_path / "ou.json"))["privleak"] == pytest.approx(privleak(auc, 0.25))
    minkpp_free = MUSE(directory, retain_logs=str(tmp_path / "ou.json"), attack="mink", **fast)
    minkpp_free.setup(tok, 256)
    assert minkpp_free._reference == 0.75  # each attack reads its own key
    (tmp_path / "ours.json").write_text(
        json.dumps({"MUSE": {"privleak_auc": 0.4}})
    )  # lit-unlearn-eval's output
    assert run(retain_logs=str(tmp_path / "ours.json"))["privleak_reference_auc"] == 0.4
    assert run(retain_auc=0.3)["privleak"] == pytest.approx(privleak(auc, 0.3))
    with caplog.at_level(logging.WARNING):
        none = run()
    assert none["privleak_reference_auc"] == 0.5 and "against an AUC of 0.5" in caplog.text


@pytest.mark.parametrize("lockstep", [False, True])
def test_two_ranks_equal_one_process(model, tok, tmp_path, lockstep, monkeypatch):
    import lit_unlearn.eval.rwku as rwku  # MUSE generates through rwku.shared_greedy
    from tests.eval.played_ranks import PlayedRanks, record_synced

    synced_flags = record_synced(monkeypatch, rwku)
    directory = write_muse(tmp_path / "muse")
    settings = dict(
        retain_auc=0.55,
        verbmem_new_tokens=4,
        knowmem_new_tokens=3,
        verbmem_batch_size=2,
        knowmem_batch_size=2,
    )
    one = MUSE(directory, **settings)
    one.setup(tok, 256)
    expected = one.compute(model, tok)
    played = PlayedRanks(lockstep)
    for rank in played.ORDER:
        metric = MUSE(directory, **settings)
        metric.setup(tok, 256)
        got = metric.compute(model, tok, played.partition(rank))
    assert played.drained
    assert got == pytest.approx(expected, rel=1e-9)
    assert set(synced_flags) == {False} | ({True} if lockstep else set())


def test_bad_input_is_one_clear_error(tok, tmp_path):
    with pytest.raises(UserError, match="attack must be one of"):
        MUSE(str(tmp_path), attack="gradnorm")
    with pytest.raises(UserError, match="not retain_model and retain_auc"):
        MUSE(str(tmp_path), retain_model="x", retain_auc=0.5)
    with pytest.raises(UserError, match=r"retain_auc must be in \[0, 1\]"):
        MUSE(str(tmp_path), retain_auc=50)
    with pytest.raises(UserError, match="verbmem_forget.json is missing.*prepare_data.py muse"):
        MUSE(str(tmp_path)).setup(tok, 64)
    directory = write_muse(tmp_path / "muse")
    os.remove(os.path.join(directory, "privleak_holdout.json"))
    with pytest.raises(UserError, match="privleak_holdout.json is missing"):
        MUSE(directory).setup(tok, 64)
    directory = write_muse(tmp_path / "muse2")
    rows = _load(directory, "knowmem_retain_qa.json")
    del rows[2]["answer"]
    json.dump(rows, open(os.path.join(directory, "knowmem_retain_qa.json"), "w"))
    with pytest.raises(DataSourceError, match="knowmem_retain_qa.json.*answer"):
        MUSE(directory).setup(tok, 64)
    directory = write_muse(tmp_path / "muse3")
    json.dump([], open(os.path.join(directory, "knowmem_forget_qa_icl.json"), "w"))
    with pytest.raises(UserError, match="knowmem_forget_qa_icl.json: no record"):
        MUSE(directory).setup(tok, 64)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json: not valid JSON"):
        read_reference_auc(str(tmp_path / "broken.json"), "minkpp")
    (tmp_path / "other.json").write_text(json.dumps({"mia_min_k": {"agg_value": 0.7}}))
    with pytest.raises(UserError, match="expected an AUC in .* under mia_min_k_plus_plus.agg_value"):
        read_reference_auc(str(tmp_path / "other.json"), "minkpp")
    with pytest.raises(UserError, match=r"MUSE retain_model: local path .*/no/such/model' does not exist"):
        MUSE(write_muse(tmp_path / "muse5"), retain_model=str(tmp_path / "no" / "such" / "model")).setup(
            tok, 64
        )
    with pytest.raises(UserError, match="chat_template: true, but the tokenizer has no chat template"):
        MUSE(write_muse(tmp_path / "muse4"), chat_template=True).setup(tok, 64)


def test_prepare_muse_writes_every_file_with_its_fields(tmp_path, monkeypatch):
    from tests.integration.cli_helpers import load_script

    module = load_script("prepare_data")
    text, qa = {"text": "t"}, {"question": "q", "answer": "a"}
    splits = {
        "raw": {s: [text] for s in ("forget", "retain1", "retain2", "holdout")},
        "verbmem": {"forget": [{"prompt": "p", "gt": "g", "extra": 1}]},
        "knowmem": {"forget_qa": [qa], "forget_qa_icl": [qa], "retain_qa": [qa], "retain_qa_icl": [qa]},
        "privleak": {"forget": [text], "holdout": [text], "retain": [text]},
    }
    older = {**splits, "knowmem": {"forget_qa": [qa], "forget_qa_icl": [qa], "retain2_qa": [qa], "retain2_qa_icl": [qa]},
             "privleak": {"forget": [text], "holdout": [text], "retain2": [{"text": "older"}]}}  # fmt: skip
    hub = {"muse-bench/MUSE-News": splits, "muse-bench/MUSE-Books": older}
    monkeypatch.setattr(module, "_split_names", lambda name, config: list(hub[name][config]))
    monkeypatch.setattr(module, "_load", lambda name, config, split="train": hub[name][config][split])
    module.prepare_muse(str(tmp_path))
    expected = sorted(f for _, _, f, _ in module.MUSE_FILES)
    assert len(expected) == 12
    for corpus in ("news", "books"):
        assert sorted(os.listdir(tmp_path / corpus)) == expected
    assert _load(str(tmp_path / "news"), "verbmem_forget.json") == [{"prompt": "p", "gt": "g", "extra": 1}]
    assert _load(str(tmp_path / "books"), "privleak_retain.json") == [{"text": "older"}]  # older split name
    assert _load(str(tmp_path / "books"), "knowmem_retain_qa_icl.json") == [qa]
    hub["muse-bench/MUSE-News"] = {**splits, "verbmem": {"forget": [{"text": "only text"}]}}
    with pytest.raises(SystemExit, match=r"MUSE-News/verbmem/forget has no \['gt', 'prompt'\]"):
        module.prepare_muse(str(tmp_path / "again"))
    hub["muse-bench/MUSE-News"] = {**splits, "privleak": {"forget": [text], "holdout": [text]}}
    with pytest.raises(SystemExit, match="MUSE-News/privleak has no split retain or retain2"):
        module.prepare_muse(str(tmp_path / "again2"))


@pytest.mark.integration
def test_the_muse_evaluation_of_a_saved_model_through_lit_unlearn_eval(smoke_target, tmp_path):
    """``lit-unlearn-eval --metrics`` with the MUSE set gives the numbers of the set in-process."""
    from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus
    from tests.conftest import SMOKE_PEOPLE
    from tests.integration.cli_helpers import evaluated_through_cli, write_synthetic_muse

    directory = write_synthetic_muse(str(tmp_path / "muse"), generate_corpus(SMOKE_PEOPLE))
    reported, expected = evaluated_through_cli(
        smoke_target,
        "MUSE",
        f"directory: {directory}, retain_auc: 0.5, verbmem_new_tokens: 6, knowmem_new_tokens: 3",
        str(tmp_path),
    )
    assert reported == pytest.approx(expected, rel=1e-6)
    # the smoke target was trained on these texts: it continues them (its word-level vocabulary has
    # no "Question:"/"Answer:", so KnowMem's wrapper is out of its world and scores ~0 here)
    assert reported["forget_verbmem_rougeL"] > 0.2
    assert reported["privleak_auc"] > 0.5 and math.isfinite(reported["privleak"])
    # lit-unlearn-eval's output is itself a PrivLeak reference for a later run
    assert read_reference_auc(str(tmp_path / "eval.json"), "minkpp") == reported["privleak_auc"]


def test_the_embedded_benchmarks_muse_view(smoke_target):
    """VerbMem = a forget document cut before its first value; KnowMem = the probes' questions;
    the model against itself as the retain model leaks nothing (PrivLeak 0)."""
    from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus
    from lit_unlearn.eval import SyntheticMUSE
    from lit_unlearn.models import load_causal_lm, load_tokenizer
    from tests.conftest import SMOKE_PEOPLE

    metric = SyntheticMUSE(num_people=SMOKE_PEOPLE, retain_model=smoke_target, max_items=30)
    tokenizer = load_tokenizer(smoke_target)
    metric.setup(tokenizer, 64)
    corpus = generate_corpus(SMOKE_PEOPLE)
    document = corpus.person_docs(corpus.forget_people)[0]
    prompts, continuations = metric._tasks["forget_verbmem"]
    first = document.value_positions[0]
    assert (prompts[0], continuations[0]) == (
        " ".join(document.text.split()[:first]),
        " ".join(document.text.split()[first:]),
    )
    forget = corpus.probes_for("qa", corpus.forget_people)
    assert metric._tasks["forget_knowmem"] == ([p.prompt for p in forget], [p.answer for p in forget])
    got = metric.compute(load_causal_lm(smoke_target), tokenizer)
    assert got["privleak"] == pytest.approx(0.0, abs=1e-6) and got["privleak_auc"] > 0.8
    assert got["forget_verbmem_rougeL"] > 0.5 and got["forget_knowmem_rougeL"] > 0.5  # the target remembers
