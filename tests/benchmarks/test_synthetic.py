"""The fictitious-knowledge generator and tokenizer."""

from __future__ import annotations

import pytest

from lit_unlearn.benchmarks.synthetic.corpus import ATTRIBUTES, build_tokenizer, generate_corpus


def test_generator_is_deterministic_and_seed_dependent():
    a, b = generate_corpus.__wrapped__(50, 0.1, 3), generate_corpus.__wrapped__(50, 0.1, 3)
    assert a.people == b.people and a.forget_people == b.forget_people
    assert [d.text for d in a.person_docs([0])] == [d.text for d in b.person_docs([0])]
    assert generate_corpus.__wrapped__(50, 0.1, 4).people != a.people


def test_default_corpus_matches_the_spec():
    c = generate_corpus()
    assert len(c.people) == 200 and len(c.forget_people) == 20 and len(c.retain_people) == 180
    assert not set(c.forget_people) & set(c.retain_people)
    assert len({name for name, _ in c.people}) == 200
    assert all(len(docs) == 21 for docs in c.docs_by_person)
    assert len(c.person_docs(c.forget_people)) == 420
    assert len(c.probes_for("qa", c.forget_people)) == 100
    assert len(c.probes_for("arithmetic")) == 400


def test_value_positions_point_at_the_attribute_values():
    c = generate_corpus(20)
    name, values = c.people[0]
    for doc in c.docs_by_person[0]:
        words = doc.text.split()
        assert {words[p] for p in doc.value_positions} <= set(values.values())
        assert len(doc.value_positions) in (1, len(ATTRIBUTES))


def test_probes_are_unambiguous_prefixes():
    """No two attributes share a statement prefix, so each probe has one right answer."""
    c = generate_corpus()
    seen = {}
    for p in c.probes_for("statement") + c.probes_for("qa"):
        assert seen.setdefault(p.prompt, p.answer) == p.answer


def test_every_answer_is_one_token_and_tokenizer_round_trips(tmp_path):
    c = generate_corpus(20)
    tok = build_tokenizer(c)
    for p in c.probes:
        assert len(tok(p.answer, add_special_tokens=False)["input_ids"]) == 1
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    text = c.docs_by_person[0][0].text
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again(text)["input_ids"][0] == again.bos_token_id
    assert tok.unk_token_id not in tok(text)["input_ids"]


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="num_people"):
        generate_corpus(1)
    with pytest.raises(ValueError, match="forget_fraction"):
        generate_corpus(20, 1.5)
