"""The DataModule: batch structure and masks, workers, ranks, validation loaders."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lit_unlearn.benchmarks.synthetic import SyntheticKnowledge
from lit_unlearn.data import TextCorpus, UnlearningDataModule
from lit_unlearn.data.cache import ArrowExamples
from lit_unlearn.data.sources import IGNORE_INDEX
from tests.conftest import SMOKE_PEOPLE


def make_dm(tokenizer_dir, **kw):
    args = dict(
        tokenizer=tokenizer_dir,
        forget=SyntheticKnowledge("forget", num_people=SMOKE_PEOPLE),
        retain=SyntheticKnowledge("retain", num_people=SMOKE_PEOPLE),
        max_length=32,
        forget_batch_size=4,
        retain_batch_size=6,
        seed=5,
    )
    args.update(kw)
    dm = UnlearningDataModule(**args)
    dm.setup("fit")
    return dm


def test_batch_structure_and_value_token_masks(synthetic_tokenizer_dir):
    dm = make_dm(synthetic_tokenizer_dir)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"forget", "retain"}
    assert batch["forget"]["input_ids"].shape[0] == 4 and batch["retain"]["input_ids"].shape[0] == 6
    for part in batch.values():
        ids, mask, labels = part["input_ids"], part["attention_mask"], part["labels"]
        assert ids.shape == mask.shape == labels.shape
        assert ((labels == IGNORE_INDEX) | (mask == 1)).all()  # no loss on padding
        assert (ids[mask == 0] == dm.tokenizer.pad_token_id).all()
        # value-token loss: exactly one (Q/A, statement) or five (biography) label tokens per row
        per_row = (labels != IGNORE_INDEX).sum(1)
        assert set(per_row.tolist()) <= {1, 5}


def test_all_token_loss_and_general_text(synthetic_tokenizer_dir):
    dm = make_dm(
        synthetic_tokenizer_dir,
        forget=SyntheticKnowledge("forget", loss_on="all", num_people=SMOKE_PEOPLE),
        retain=SyntheticKnowledge("retain", include_general=True, num_people=SMOKE_PEOPLE),
    )
    ex = dm.forget_examples[0]
    assert torch.equal(ex["labels"][1:], ex["input_ids"][1:]) and ex["labels"][0] == IGNORE_INDEX
    n_people_docs = (SMOKE_PEOPLE - 2) * 21
    assert len(dm.retain_examples) == n_people_docs + 430  # + arithmetic and counting
    assert len(dm.forget_examples) == 2 * 21


def test_forget_anchored_epoch_length(synthetic_tokenizer_dir):
    dm = make_dm(synthetic_tokenizer_dir)
    assert len(dm.train_dataloader()) == len(dm.forget_examples) // 4


def _all(loader):
    from lightning.fabric.utilities.apply_func import apply_to_collection

    return [apply_to_collection(b, torch.Tensor, torch.clone) for b in loader]


def test_num_workers_do_not_change_batches(synthetic_tokenizer_dir):
    a = _all(make_dm(synthetic_tokenizer_dir, num_workers=0).train_dataloader())
    b = _all(make_dm(synthetic_tokenizer_dir, num_workers=2).train_dataloader())
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for part in ("forget", "retain"):
            assert torch.equal(x[part]["input_ids"], y[part]["input_ids"])
        assert torch.equal(x["forget"]["alternate"]["input_ids"], y["forget"]["alternate"]["input_ids"])


def test_two_fake_ranks_draw_different_retain_samples(synthetic_tokenizer_dir):
    dm = make_dm(synthetic_tokenizer_dir)
    r0 = list(dm.make_sampler(rank=0, world_size=2))
    r1 = list(dm.make_sampler(rank=1, world_size=2))
    for (f0, q0), (f1, q1) in zip(r0, r1):
        assert not set(q0) & set(q1) and not set(f0) & set(f1)


def test_resume_state_continues_the_sequence(synthetic_tokenizer_dir):
    dm = make_dm(synthetic_tokenizer_dir)
    full = _all(dm.train_dataloader())
    resumed = make_dm(synthetic_tokenizer_dir)
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 3, "seed": 5})
    rest = _all(resumed.train_dataloader())
    assert len(rest) == len(full) - 3
    assert all(
        torch.equal(a["retain"]["input_ids"], b["retain"]["input_ids"]) for a, b in zip(rest, full[3:])
    )


def test_validation_loaders(synthetic_tokenizer_dir):
    dm = make_dm(
        synthetic_tokenizer_dir,
        val_forget=SyntheticKnowledge("forget", num_people=SMOKE_PEOPLE),
        eval_batch_size=8,
    )
    assert dm.val_names == ["forget"]
    (loader,) = dm.val_dataloader()
    assert next(iter(loader))["input_ids"].shape[0] == 8


def test_bad_arguments_name_the_flag(synthetic_tokenizer_dir):
    with pytest.raises(ValueError, match="--data.max_length"):
        make_dm(synthetic_tokenizer_dir, max_length=1)
    with pytest.raises(ValueError, match="max_length=8"):
        make_dm(synthetic_tokenizer_dir, max_length=8)
    with pytest.raises(ValueError, match="--data.forget and --data.retain"):
        make_dm(synthetic_tokenizer_dir, forget=[])


def _corpus_dm(tokenizer_dir, path, cache_dir, max_length=16):
    return UnlearningDataModule(
        tokenizer_dir,
        TextCorpus(path),
        TextCorpus(path),
        max_length=max_length,
        forget_batch_size=2,
        cache_dir=cache_dir,
    )


def test_cached_examples_equal_in_memory_ones_and_are_reused(synthetic_tokenizer_dir, tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"Alice lives in Paris {i} " * (i % 5 + 1)}) + "\n" for i in range(40))
    )
    cache = tmp_path / "cache"
    plain = _corpus_dm(synthetic_tokenizer_dir, str(path), None)
    plain.setup("fit")
    cached = _corpus_dm(synthetic_tokenizer_dir, str(path), str(cache))
    cached.prepare_data()  # one process per node builds the cache ...

    def entries():
        return sorted(e for e in os.listdir(cache) if e != "validated" and not e.endswith(".lock"))

    first = entries()
    assert len(first) == 1  # forget and retain are the same source: one entry
    cached.setup("fit")  # ... and every rank memory-maps it
    assert isinstance(cached.forget_examples, ArrowExamples)
    assert len(cached.forget_examples) == len(plain.forget_examples) > 1
    for a, b in zip(plain.forget_examples, cached.forget_examples):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch_a = next(iter(plain.train_dataloader(rank=0, world_size=1)))
    batch_b = next(iter(cached.train_dataloader(rank=0, world_size=1)))
    assert all(torch.equal(batch_a["forget"][k], batch_b["forget"][k]) for k in batch_a["forget"])
    reads = []
    original = TextCorpus.validate
    monkeypatch.setattr(TextCorpus, "validate", lambda self: reads.append(1) or original(self))
    again = _corpus_dm(synthetic_tokenizer_dir, str(path), str(cache))
    again.setup("fit")  # a second launch: a cache hit, no new entry, the unchanged file is not read
    assert entries() == first and reads == []
    path.write_text(path.read_text() + json.dumps({"text": "Bob works in Rome"}) + "\n")  # the file changed
    changed = _corpus_dm(synthetic_tokenizer_dir, str(path), str(cache))
    changed.setup("fit")
    assert len(entries()) == 2 and len(changed.forget_examples) >= len(plain.forget_examples)
    assert reads  # the changed file was read and checked again
    other = _corpus_dm(synthetic_tokenizer_dir, str(path), str(cache), max_length=8)
    other.setup("fit")  # max_length is part of the key too
    assert len(entries()) == 3
