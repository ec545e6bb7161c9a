"""Padding examples into batches (right padding; labels -100 on padding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lit_unlearn.data.sources import ALTERNATE, IGNORE_INDEX, Example


def _stack_extra(key: str, values: list[Tensor]) -> Tensor:
    """Stack one extra per-example field: scalars and equal shapes as they are; 1-D tensors of
    different lengths right-padded with 0 (a ``<key>_mask`` would be the objective's business)."""
    if all(v.shape == values[0].shape for v in values):
        return torch.stack(values)
    if all(v.dim() == 1 for v in values):
        out = torch.zeros((len(values), max(v.numel() for v in values)), dtype=values[0].dtype)
        for i, v in enumerate(values):
            out[i, : v.numel()] = v
        return out
    raise ValueError(
        f"example field {key!r}: cannot batch tensors of shapes {sorted({tuple(v.shape) for v in values})}"
    )


def pad_examples(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Stack examples into ``input_ids``, ``attention_mask`` and ``labels``, padded on the right.

    Alternate answers (``alternate_input_ids`` / ``alternate_labels``) become the sub-batch
    ``batch["alternate"]``, padded on its own. Any other tensor field the examples carry (e.g. a
    per-example weight) is passed through, stacked (1-D fields of different lengths padded with
    0), so a custom objective can read it from its batch.
    """
    length = max(ex["input_ids"].numel() for ex in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = ex["input_ids"].numel()
        input_ids[i, :n] = ex["input_ids"]
        labels[i, :n] = ex["labels"]
        mask[i, :n] = 1
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if ALTERNATE + "input_ids" in examples[0]:
        keys = ("input_ids", "labels")
        out["alternate"] = pad_examples([{k: ex[ALTERNATE + k] for k in keys} for ex in examples], pad_id)
    extra = [
        k
        for k in examples[0]
        if k not in out and not k.startswith(ALTERNATE) and isinstance(examples[0][k], Tensor)
    ]
    for key in extra:
        out[key] = _stack_extra(key, [torch.as_tensor(ex[key]) for ex in examples])
    return out


class PairedBatches(torch.utils.data.Dataset):
    """Indexed by ``(forget_indices, retain_indices)``; returns ``{"forget": batch, "retain": batch}``."""

    def __init__(self, forget: Sequence[Example], retain: Sequence[Example], pad_id: int) -> None:
        self.forget, self.retain, self.pad_id = forget, retain, pad_id

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: tuple[list[int], list[int]]) -> dict[str, dict[str, Any]]:
        f_idx, r_idx = index
        forget = pad_examples([self.forget[i] for i in f_idx], self.pad_id)
        retain = pad_examples([self.retain[i] for i in r_idx], self.pad_id)
        # dataset positions travel with the batch (e.g. NPO's precomputed reference table)
        forget["index"] = torch.tensor(f_idx, dtype=torch.long)
        retain["index"] = torch.tensor(r_idx, dtype=torch.long)
        return {"forget": forget, "retain": retain}


class PaddedExamples(torch.utils.data.Dataset):
    """A plain list of examples (evaluation); collate with :meth:`collate`."""

    def __init__(self, examples: Sequence[Example], pad_id: int) -> None:
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        return pad_examples(examples, self.pad_id)
