"""Alternate answers (IdkDPO's preferred refusals): where they come from, how they are picked,
how they are batched, cached and checked."""

from __future__ import annotations

import collections
import json
import logging

import pytest
import torch

from lit_unlearn.benchmarks.synthetic import SyntheticKnowledge
from lit_unlearn.data import QAPairs, UnlearningDataModule
from lit_unlearn.data.collate import pad_examples
from lit_unlearn.data.sources import IGNORE_INDEX, DataSourceError, read_alternates
from lit_unlearn.engine.checks import check_alternates
from lit_unlearn.errors import UserError
from lit_unlearn.models import load_tokenizer
from lit_unlearn.objectives import DPO, NPO
from tests.conftest import SMOKE_PEOPLE
from tests.data.test_sources import write_jsonl

REFUSALS = ["I don't know.", "No idea.", "I cannot say.", "Not something I know about."]


def questions(n):
    return [
        {"question": f"Who wrote book number {i}?", "answer": f"Author {i} wrote it in {1900 + i}."}
        for i in range(n)
    ]


def decoded_alternates(tok, examples):
    return [
        tok.decode(
            ex["alternate_input_ids"][ex["alternate_labels"] != IGNORE_INDEX], skip_special_tokens=True
        )
        for ex in examples
    ]


def test_a_records_own_alternate_is_its_preferred_answer_under_the_same_prompt(tok, tmp_path):
    rows = questions(3)
    rows[0]["alternate"] = "I don't know."
    rows[1]["alternate"] = "No idea at all, sorry, I really could not tell you anything."
    rows[2]["alternate"] = ["Unsure."]  # a list with one choice
    examples = QAPairs(write_jsonl(tmp_path / "f.jsonl", rows)).build(tok, 256)
    assert decoded_alternates(tok, examples) == [
        r["alternate"] if isinstance(r["alternate"], str) else r["alternate"][0] for r in rows
    ]
    for ex in examples:
        prompt = ex["labels"] == IGNORE_INDEX
        n_prompt = int(prompt.sum())
        # same prompt tokens, loss on the alternate's answer tokens only
        assert torch.equal(ex["alternate_input_ids"][:n_prompt], ex["input_ids"][:n_prompt])
        assert (ex["alternate_labels"][:n_prompt] == IGNORE_INDEX).all()
        assert (ex["alternate_labels"][n_prompt:] != IGNORE_INDEX).all()


def test_refusals_are_picked_from_the_seed_and_the_position_alone(tok, tmp_path):
    forget = write_jsonl(tmp_path / "f.jsonl", questions(40))
    refusals = tmp_path / "idk.txt"
    refusals.write_text("\n".join(REFUSALS) + "\n\n")
    first = decoded_alternates(tok, QAPairs(forget, alternates_file=str(refusals)).build(tok, 64))
    again = decoded_alternates(tok, QAPairs(forget, alternates_file=str(refusals)).build(tok, 64))
    other_seed = decoded_alternates(
        tok, QAPairs(forget, alternates_file=str(refusals), seed=1).build(tok, 64)
    )
    assert first == again  # a fresh process, another rank or a resume builds the same pairs
    assert first != other_seed
    counts = collections.Counter(first)
    assert set(counts) == set(REFUSALS) and min(counts.values()) >= 4  # every refusal used, none dominates
    # the picks do not depend on the rest of the file: a record keeps its refusal when others are added
    longer = write_jsonl(tmp_path / "g.jsonl", questions(60))
    assert (
        decoded_alternates(tok, QAPairs(longer, alternates_file=str(refusals)).build(tok, 64))[:40] == first
    )


def test_a_records_own_alternate_wins_over_the_refusals_file(tok, tmp_path):
    rows = questions(4)
    rows[2]["alternate"] = "Only this one."
    refusals = tmp_path / "idk.json"
    refusals.write_text(json.dumps(["I don't know."]))
    examples = QAPairs(write_jsonl(tmp_path / "f.jsonl", rows), alternates_file=str(refusals)).build(tok, 64)
    assert decoded_alternates(tok, examples) == ["I don't know."] * 2 + ["Only this one."] + ["I don't know."]


def test_refusal_files_in_every_format_read_alike(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(REFUSALS))
    (tmp_path / "a.json").write_text(json.dumps(REFUSALS))
    write_jsonl(tmp_path / "a.jsonl", [{"text": r} for r in REFUSALS])
    write_jsonl(tmp_path / "b.jsonl", REFUSALS)
    for name in ("a.txt", "a.json", "a.jsonl", "b.jsonl"):
        assert read_alternates(str(tmp_path / name)) == REFUSALS, name


def test_the_shipped_refusals_file_reads(tmp_path):
    from tests.integration.cli_helpers import ROOT

    refusals = read_alternates(f"{ROOT}/configs/data/idk_refusals.txt")
    assert len(refusals) >= 20 and len(set(refusals)) == len(refusals)


@pytest.mark.parametrize(
    "rows, refusals, match",
    [
        (
            [{"question": "q", "answer": "a", "alternate": "x"}, {"question": "q2", "answer": "b"}],
            None,
            r"f\.jsonl:2: no 'alternate' field",
        ),
        ([{"question": "q", "answer": "a", "alternate": 3}], None, r"f\.jsonl:1: field 'alternate' must be"),
        (
            [{"question": "q", "answer": "a", "alternate": ["x", ""]}],
            None,
            r"f\.jsonl:1: field 'alternate' must be",
        ),
        ([{"question": "q", "answer": "a"}], "missing.txt", r"missing\.txt: file not found"),
        ([{"question": "q", "answer": "a"}], "blank.txt", r"blank\.txt: file is empty"),
        ([{"question": "q", "answer": "a"}], "bad.json", r"bad\.json\[1\]: empty alternate answer"),
    ],
)
def test_bad_alternates_fail_naming_the_file_and_record(tmp_path, rows, refusals, match):
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "bad.json").write_text(json.dumps(["fine", " "]))
    source = QAPairs(
        write_jsonl(tmp_path / "f.jsonl", rows),
        alternates_file=str(tmp_path / refusals) if refusals else None,
    )
    with pytest.raises(DataSourceError, match=match):
        source.validate()


def test_alternates_form_their_own_padded_sub_batch(tok, tmp_path):
    rows = questions(3)
    for row, alt in zip(
        rows, ["No.", "I could not possibly tell you who wrote that book, sorry.", "Unknown."]
    ):
        row["alternate"] = alt
    examples = QAPairs(write_jsonl(tmp_path / "f.jsonl", rows)).build(tok, 256)
    batch = pad_examples(examples, tok.pad_token_id)
    alt = batch["alternate"]
    assert set(alt) == {"input_ids", "attention_mask", "labels"}
    lengths = [ex["alternate_input_ids"].numel() for ex in examples]
    assert alt["input_ids"].shape == (3, max(lengths)) and alt["attention_mask"].sum(1).tolist() == lengths
    assert ((alt["labels"] == IGNORE_INDEX) | (alt["attention_mask"] == 1)).all()
    # the forget answer's own batch is what it is without alternates
    plain = pad_examples([{k: ex[k] for k in ("input_ids", "labels")} for ex in examples], tok.pad_token_id)
    assert plain.keys() == batch.keys() - {"alternate"}
    assert all(torch.equal(plain[k], batch[k]) for k in plain)


def test_long_alternates_are_truncated_like_answers(tok, tmp_path):
    rows = [{"question": "Who wrote it?", "answer": "Someone.", "alternate": "no " * 100}]
    (example,) = QAPairs(write_jsonl(tmp_path / "f.jsonl", rows)).build(tok, 16)
    assert (
        example["alternate_input_ids"].numel() == 16 and (example["alternate_labels"] != IGNORE_INDEX).any()
    )


def test_the_embedded_benchmark_refuses_each_value_of_its_forget_people(synthetic_tokenizer_dir):
    tok = load_tokenizer(synthetic_tokenizer_dir)
    forget = SyntheticKnowledge("forget", num_people=SMOKE_PEOPLE).build(tok, 64)
    for ex in forget:
        values = ex["labels"] != IGNORE_INDEX
        assert values.any() and torch.equal(ex["alternate_labels"] != IGNORE_INDEX, values)
        assert (ex["alternate_input_ids"][values] == tok.unk_token_id).all()  # "I don't know"
        assert torch.equal(ex["alternate_input_ids"][~values], ex["input_ids"][~values])
    retain = SyntheticKnowledge("retain", num_people=SMOKE_PEOPLE).build(tok, 64)
    assert not any(k.startswith("alternate") for k in retain[0])


def test_alternates_survive_the_cache_and_reach_the_training_batch(synthetic_tokenizer_dir, tmp_path):
    def dm():
        module = UnlearningDataModule(
            synthetic_tokenizer_dir,
            SyntheticKnowledge("forget", num_people=SMOKE_PEOPLE),
            SyntheticKnowledge("retain", num_people=SMOKE_PEOPLE),
            max_length=32,
            forget_batch_size=4,
            cache_dir=str(tmp_path / "cache"),
        )
        module.prepare_data()
        module.setup("fit")
        return module

    built, cached = dm(), dm()  # the second reads the cache the first wrote
    assert built.has_alternates and cached.has_alternates
    for a, b in zip(built.forget_examples, cached.forget_examples):
        assert torch.equal(a["alternate_input_ids"], b["alternate_input_ids"])
    batch = next(iter(cached.train_dataloader()))
    assert batch["forget"]["alternate"]["input_ids"].shape[0] == 4 and "alternate" not in batch["retain"]
    precomputed = next(cached.forget_batches("cpu"))
    assert precomputed["alternate"]["labels"].device.type == "cpu"


def test_a_group_where_only_some_sources_have_alternates_keeps_none(tok, tmp_path, caplog, bpe_tokenizer_dir):
    with_alt = questions(4)
    for row in with_alt:
        row["alternate"] = "No idea."
    dm = UnlearningDataModule(
        bpe_tokenizer_dir,
        [
            QAPairs(write_jsonl(tmp_path / "a.jsonl", with_alt)),
            QAPairs(write_jsonl(tmp_path / "b.jsonl", questions(4))),
        ],
        QAPairs(write_jsonl(tmp_path / "r.jsonl", questions(4))),
        max_length=64,
        forget_batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert not dm.has_alternates and "only some sources have alternate answers" in caplog.text
    with pytest.raises(UserError, match=r"--data.forget.init_args.alternates_file"):
        check_alternates(DPO(), dm)
    check_alternates(NPO(), dm)  # objectives that do not need them do not care
