"""Padding and the pass-through of extra example fields."""

from __future__ import annotations

import pytest
import torch

from lit_unlearn.data.collate import pad_examples


def test_extra_fields_reach_the_batch_for_custom_objectives():
    examples = [
        {
            "input_ids": torch.tensor([5, 6, 7]),
            "labels": torch.tensor([-100, 6, 7]),
            "weight": torch.tensor(0.5),
            "rejected_ids": torch.tensor([9, 9]),
        },
        {
            "input_ids": torch.tensor([5]),
            "labels": torch.tensor([5]),
            "weight": torch.tensor(2.0),
            "rejected_ids": torch.tensor([8, 8, 8, 8]),
        },
    ]
    batch = pad_examples(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["weight"].tolist() == [0.5, 2.0]
    assert batch["rejected_ids"].tolist() == [[9, 9, 0, 0], [8, 8, 8, 8]]


def test_unbatchable_extra_field_names_the_field():
    examples = [
        {"input_ids": torch.tensor([1]), "labels": torch.tensor([1]), "grid": torch.zeros(2, 2)},
        {"input_ids": torch.tensor([1]), "labels": torch.tensor([1]), "grid": torch.zeros(3, 1)},
    ]
    with pytest.raises(ValueError, match="'grid'"):
        pad_examples(examples, pad_id=0)
