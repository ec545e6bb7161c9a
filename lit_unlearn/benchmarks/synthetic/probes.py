"""Probe metrics as pure functions of (model, tokenizer, data): exact-match and perplexity.

Prompts are right-padded; the prediction is read at each row's own last real position, so
padding never changes a result (tested against one-by-one evaluation).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_unlearn.benchmarks.synthetic.corpus import Probe, SyntheticCorpus
from lit_unlearn.data.collate import pad_examples
from lit_unlearn.objectives.functional import sequence_nll


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@functools.lru_cache(maxsize=2**16)
def _ids(tokenizer: Any, text: str, special: bool = True) -> tuple[int, ...]:
    """Token ids of ``text`` (cached: every evaluation of a run asks for the same probes)."""
    return tuple(tokenizer(text, add_special_tokens=special)["input_ids"])


@torch.no_grad()
def next_token_accuracy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 256
) -> float:
    """Share of prompts whose greedy next token is the (single-token) answer."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return float("nan")
    answer_ids = []
    for a in answers:
        answer = _ids(tokenizer, a, False)
        if len(answer) != 1:
            raise ValueError(
                f"answer {a!r} is {len(answer)} tokens; next-token probes need single-token answers"
            )
        answer_ids.append(answer[0])
    device = _device(model)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [torch.tensor(_ids(tokenizer, p)) for p in chunk]
        batch = pad_examples([{"input_ids": ids, "labels": ids} for ids in encoded], tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        pred = logits[torch.arange(len(chunk), device=device), last].argmax(-1)
        target = torch.tensor(answer_ids[start : start + batch_size], device=device)
        correct += int((pred == target).sum())
    model.train(was_training)
    return correct / len(prompts)


@torch.no_grad()
def token_nll(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Summed next-token NLL over label tokens (labels != -100) and the token count."""
    device = _device(model)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        seq_nll, n_tokens = sequence_nll(logits.float(), batch["labels"].to(device))
        total += float(seq_nll.sum())
        count += int(n_tokens.sum())
    model.train(was_training)
    return total, count


def perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64) -> float:
    """Token-level perplexity of ``texts`` (each with BOS; loss on every following token)."""
    examples = []
    for t in texts:
        ids = torch.tensor(_ids(tokenizer, t))
        labels = ids.clone()
        labels[0] = -100
        examples.append({"input_ids": ids, "labels": labels})
    batches = [
        pad_examples(examples[i : i + batch_size], tokenizer.pad_token_id)
        for i in range(0, len(examples), batch_size)
    ]
    total, count = token_nll(model, batches)
    return math.exp(total / max(count, 1))


def probe_accuracy(model: nn.Module, tokenizer: Any, probes: Sequence[Probe], batch_size: int = 256) -> float:
    """Exact-match accuracy on a list of synthetic probes."""
    return next_token_accuracy(
        model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes], batch_size
    )


def synthetic_metrics(model: nn.Module, tokenizer: Any, corpus: SyntheticCorpus) -> dict[str, float]:
    """All probe metrics of the fictitious-knowledge benchmark.

    Keys: ``forget_qa``, ``forget_statement``, ``retain_qa``, ``retain_statement``,
    ``general_arithmetic`` (accuracy) and ``general_ppl`` (perplexity of the general text).
    """
    out = {}
    for split, people in (("forget", corpus.forget_people), ("retain", corpus.retain_people)):
        for kind in ("qa", "statement"):
            out[f"{split}_{kind}"] = probe_accuracy(model, tokenizer, corpus.probes_for(kind, people))
    out["general_arithmetic"] = probe_accuracy(model, tokenizer, corpus.probes_for("arithmetic"))
    out["general_ppl"] = perplexity(model, tokenizer, [d.text for d in corpus.general_docs])
    return out
