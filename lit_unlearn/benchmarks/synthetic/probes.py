"""Probe metrics as pure functions of (model, tokenizer, data): exact-match and perplexity.

Prompts are right-padded; the prediction is read at each row's own last real position, so
padding never changes a result (tested against one-by-one evaluation).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lit_unlearn.benchmarks.synthetic.corpus import Probe, SyntheticCorpus
from lit_unlearn.data.collate import pad_examples
from lit_unlearn.objectives.functional import sequence_nll
from lit_unlearn.partition import SINGLE, Partition


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@functools.lru_cache(maxsize=2**16)
def _ids(tokenizer: Any, text: str, special: bool = True) -> tuple[int, ...]:
    """Token ids of ``text`` (cached: every evaluation of a run asks for the same probes)."""
    return tuple(tokenizer(text, add_special_tokens=special)["input_ids"])


def _answer_ids(tokenizer: Any, answers: Sequence[str]) -> list[int]:
    out = []
    for a in answers:
        answer = _ids(tokenizer, a, False)
        if len(answer) != 1:
            raise ValueError(
                f"answer {a!r} is {len(answer)} tokens; next-token probes need single-token answers"
            )
        out.append(answer[0])
    return out


@torch.no_grad()
def _correct(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int,
    partition: Partition,
) -> int:
    """How many of this process's share of the prompts have the answer as greedy next token."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    answer_ids = _answer_ids(tokenizer, answers)
    device = _device(model)
    was_training = model.training
    model.eval()
    correct = 0
    for rows, counted in partition.batches(range(len(prompts)), batch_size):
        encoded = [torch.tensor(_ids(tokenizer, prompts[i])) for i in rows]
        batch = pad_examples([{"input_ids": ids, "labels": ids} for ids in encoded], tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        if not counted:
            continue  # a lockstep dummy batch: the forward ran, the result counts nowhere
        last = mask.sum(1) - 1
        pred = logits[torch.arange(len(rows), device=device), last].argmax(-1)
        target = torch.tensor([answer_ids[i] for i in rows], device=device)
        correct += int((pred == target).sum())
    model.train(was_training)
    return correct


def next_token_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 256,
    partition: Partition = SINGLE,
) -> float:
    """Share of prompts whose greedy next token is the (single-token) answer (with a
    ``partition``: each process evaluates its share and the counts are summed)."""
    if not prompts:
        return float("nan")
    (correct,) = partition.total([_correct(model, tokenizer, prompts, answers, batch_size, partition)])
    return correct / len(prompts)


@torch.no_grad()
def token_nll(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], bool]]
) -> tuple[float, int]:
    """Summed next-token NLL over label tokens (labels != -100) and the token count; a batch may
    come as ``(batch, counted)``, and an uncounted one is run but not added."""
    device = _device(model)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for item in batches:
        batch, counted = item if isinstance(item, tuple) else (item, True)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        if counted:
            seq_nll, n_tokens = sequence_nll(logits.float(), batch["labels"].to(device))
            total += float(seq_nll.double().sum())
            count += int(n_tokens.sum())
    model.train(was_training)
    return total, count


def _text_examples(tokenizer: Any, texts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    examples = []
    for t in texts:
        ids = torch.tensor(_ids(tokenizer, t))
        labels = ids.clone()
        labels[0] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def _local_nll(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int, partition: Partition
) -> tuple[float, int]:
    examples = _text_examples(tokenizer, texts)
    batches = (
        (pad_examples([examples[i] for i in rows], tokenizer.pad_token_id), counted)
        for rows, counted in partition.batches(range(len(examples)), batch_size)
    )
    return token_nll(model, batches)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    partition: Partition = SINGLE,
) -> float:
    """Token-level perplexity of ``texts`` (each with BOS; loss on every following token)."""
    total, count = partition.total(_local_nll(model, tokenizer, texts, batch_size, partition))
    return math.exp(total / max(count, 1))


def probe_accuracy(
    model: nn.Module,
    tokenizer: Any,
    probes: Sequence[Probe],
    batch_size: int = 256,
    partition: Partition = SINGLE,
) -> float:
    """Exact-match accuracy on a list of synthetic probes."""
    return next_token_accuracy(
        model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes], batch_size, partition
    )


def synthetic_metrics(
    model: nn.Module, tokenizer: Any, corpus: SyntheticCorpus, partition: Partition = SINGLE
) -> dict[str, float]:
    """All probe metrics of the fictitious-knowledge benchmark (with a ``partition``: each process
    evaluates its share of every probe set and of the general text; one sum over processes).

    Keys: ``forget_qa``, ``forget_statement``, ``retain_qa``, ``retain_statement``,
    ``general_arithmetic`` (accuracy) and ``general_ppl`` (perplexity of the general text).
    """
    sets = {
        f"{split}_{kind}": corpus.probes_for(kind, people)
        for split, people in (("forget", corpus.forget_people), ("retain", corpus.retain_people))
        for kind in ("qa", "statement")
    }
    sets["general_arithmetic"] = corpus.probes_for("arithmetic")
    local: list[float] = [
        _correct(model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes], 256, partition)
        for probes in sets.values()
    ]
    local += _local_nll(model, tokenizer, [d.text for d in corpus.general_docs], 64, partition)
    *correct, nll, tokens = partition.total(local)
    out = {
        key: (c / len(probes) if probes else float("nan")) for (key, probes), c in zip(sets.items(), correct)
    }
    out["general_ppl"] = math.exp(nll / max(tokens, 1))
    return out
