"""RWKU evaluation: greedy answers scored by ROUGE-L recall against the gold answers.

RWKU (Jin et al. 2024) probes a forgotten target at three levels — 1: fill-in-the-blank,
2: question answering, 3: adversarial prompts — and its neighbours at levels 1-2 (retention).
Files follow RWKU's JSON layout: a list of ``{"query": ..., "answer": ...}`` records per level.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_unlearn.data.sources import read_records
from lit_unlearn.eval.metrics import MetricSet

LEVEL_FILES = {
    "forget_level1": "forget_level1.json",
    "forget_level2": "forget_level2.json",
    "forget_level3": "forget_level3.json",
    "neighbor_level1": "neighbor_level1.json",
    "neighbor_level2": "neighbor_level2.json",
}


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS length over the reference length (torchmetrics' normalisation)."""
    from torchmetrics.functional.text.rouge import rouge_score

    if not reference.strip():
        return 0.0
    return float(rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_recall"])


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    stop_strings: Sequence[str] = ("\n",),
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations, batched with left padding; each cut at the first stop string."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(
                device
            )
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in gen[:, enc["input_ids"].shape[1] :]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                for stop in stop_strings:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                outputs.append(text.strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


class RWKU(MetricSet):
    """ROUGE-L recall of greedy answers on RWKU forget levels 1-3 and neighbour levels 1-2.

    Keys: ``forget_rougeL_level{1,2,3}``, ``forget_rougeL`` (mean over forget items),
    ``retain_neighbor_rougeL_level{1,2}``, ``retain_neighbor_rougeL``.

    Args:
        directory: folder with RWKU files (``forget_level1.json`` ... ``neighbor_level2.json``);
            missing levels are skipped.
        max_new_tokens: generation budget (RWKU: 32).
        stop_strings: cut the answer at the first of these.
        batch_size: generation batch size.
        outputs_path: if set, per-item outputs are written there as JSONL after each evaluation.
    """

    def __init__(
        self,
        directory: str,
        max_new_tokens: int = 32,
        stop_strings: list[str] | None = None,
        batch_size: int = 16,
        outputs_path: str | None = None,
    ) -> None:
        self.directory, self.max_new_tokens, self.batch_size = directory, max_new_tokens, batch_size
        self.stop_strings = stop_strings if stop_strings is not None else ["\n"]
        self.outputs_path = outputs_path
        self._items: dict[str, list[dict[str, str]]] = {}

    def setup(self, tokenizer: Any, max_length: int) -> None:
        for level, name in LEVEL_FILES.items():
            path = os.path.join(self.directory, name)
            if os.path.exists(path):
                self._items[level] = read_records(path, ["query", "answer"])
        if not self._items:
            raise FileNotFoundError(f"RWKU: none of {list(LEVEL_FILES.values())} found in {self.directory}")

    def compute(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        results: dict[str, float] = {}
        per_item = []
        for group, prefix in (("forget", "forget_rougeL"), ("neighbor", "retain_neighbor_rougeL")):
            scores_all = []
            for level, items in self._items.items():
                if not level.startswith(group):
                    continue
                answers = greedy_generate(
                    model,
                    tokenizer,
                    [it["query"] for it in items],
                    self.max_new_tokens,
                    self.stop_strings,
                    self.batch_size,
                )
                scores = [rouge_l_recall(a, it["answer"]) for a, it in zip(answers, items)]
                results[f"{prefix}_{level.split('_')[1]}"] = sum(scores) / len(scores)
                scores_all += scores
                per_item += [
                    {
                        "level": level,
                        "query": it["query"],
                        "answer": it["answer"],
                        "output": a,
                        "rougeL_recall": s,
                    }
                    for it, a, s in zip(items, answers, scores)
                ]
            if scores_all:
                results[prefix] = sum(scores_all) / len(scores_all)
        if self.outputs_path:
            with open(self.outputs_path, "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in per_item)
        return results
