"""The target recipe: the oracle never sees the forget people; the cache is reused only on a match."""

from __future__ import annotations

import json

from lit_unlearn.benchmarks.synthetic.corpus import build_tokenizer, generate_corpus
from lit_unlearn.benchmarks.synthetic.target import PretrainBatches, TargetRecipe, _cached, build_target


def test_oracle_batches_exclude_forget_people():
    corpus = generate_corpus(20)
    tok = build_tokenizer(corpus)
    forget_names = {
        corpus.people[p][0].split()[0] + " " + corpus.people[p][0].split()[1] for p in corpus.forget_people
    }
    oracle = PretrainBatches(corpus, tok, TargetRecipe(num_people=20, steps=5, oracle=True))
    full = PretrainBatches(corpus, tok, TargetRecipe(num_people=20, steps=5))
    texts = lambda ds: {tok.decode(ex["input_ids"][1:]) for ex in ds.knowledge}  # noqa: E731
    assert not any(name in t for t in texts(oracle) for name in forget_names)
    assert any(name in t for t in texts(full) for name in forget_names)
    batch = oracle[0]
    assert batch["input_ids"].shape[0] == 64 and (batch["labels"][:, 0] == -100).all()


def test_cached_target_is_reused_only_when_the_recipe_matches(smoke_target, capsys):
    from tests.conftest import SMOKE_PEOPLE, SMOKE_STEPS

    metrics = build_target(smoke_target, num_people=SMOKE_PEOPLE, steps=SMOKE_STEPS, progress=False)
    assert "reusing cached model" in capsys.readouterr().out
    assert metrics == json.load(open(f"{smoke_target}/metrics.json"))
    assert (
        _cached(
            __import__("pathlib").Path(smoke_target),
            TargetRecipe(num_people=SMOKE_PEOPLE, steps=SMOKE_STEPS + 1),
        )
        is None
    )
