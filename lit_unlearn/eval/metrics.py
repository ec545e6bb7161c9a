"""Metric sets evaluated during training: each maps (model, tokenizer) to named numbers.

Keys start with the split they measure — ``forget_``, ``retain_`` or ``general_`` — and are logged
as ``val/<key>`` by :class:`~lit_unlearn.eval.callbacks.UnlearningEvaluator`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from lit_unlearn.benchmarks.synthetic.corpus import Subset, generate_corpus, select_people
from lit_unlearn.benchmarks.synthetic.probes import synthetic_metrics, token_nll
from lit_unlearn.data.collate import pad_examples
from lit_unlearn.data.sources import DataSource, DataSourceError, read_records
from lit_unlearn.objectives.functional import sequence_nll
from lit_unlearn.partition import SINGLE, Partition

Split = Literal["forget", "retain", "general"]


class MetricSet(ABC):
    """A group of metrics computed together on one model state."""

    data_parallel: bool = False
    """Whether :meth:`compute` takes a ``partition`` and evaluates only its share of the documents
    (the evaluator then runs it on every rank; otherwise on rank 0, or on every rank of a sharded
    model)."""

    def setup(self, tokenizer: Any, max_length: int) -> None:
        """Load and tokenize data once (called before the first evaluation)."""

    @abstractmethod
    def compute(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        """Evaluate; keys are ``forget_*``, ``retain_*`` or ``general_*``."""


class SyntheticProbes(MetricSet):
    """Q/A and statement exact match on forget and retain people, arithmetic accuracy and
    general-text perplexity of the fictitious-knowledge benchmark.

    Keys: ``forget_qa``, ``forget_statement``, ``retain_qa``, ``retain_statement``,
    ``general_arithmetic``, ``general_ppl``.

    Args:
        num_people: corpus size (must match the target).
        forget_fraction: share of forget people (must match the target).
        seed: corpus seed (must match the target).
        forget_subset: probe ``all`` forget people, or after a relearning attack only the
            ``held_out`` ones (the ``relearn`` slice is what the attack trained on), or one half of
            those: ``held_out_validation`` (to tune an attack on) / ``held_out_test`` (to report).
        relearn_fraction: size of the relearn slice (as in ``SyntheticKnowledge``).
        forget_name: the prefix of the forget keys (``<forget_name>_qa``, ...), so two subsets can
            be measured side by side (e.g. ``validation`` and ``test``).
    """

    def __init__(
        self,
        num_people: int = 200,
        forget_fraction: float = 0.1,
        seed: int = 0,
        forget_subset: Subset = "all",
        relearn_fraction: float = 0.5,
        forget_name: str = "forget",
    ) -> None:
        self.num_people, self.forget_fraction, self.seed = num_people, forget_fraction, seed
        self.forget_subset, self.relearn_fraction = forget_subset, relearn_fraction
        self.forget_name = forget_name

    data_parallel = True

    def compute(self, model: nn.Module, tokenizer: Any, partition: Partition = SINGLE) -> dict[str, float]:
        corpus = generate_corpus(self.num_people, self.forget_fraction, self.seed)  # cached: not mutated
        forget = select_people(corpus.forget_people, self.forget_subset, self.relearn_fraction)
        values = synthetic_metrics(
            model, tokenizer, dataclasses.replace(corpus, forget_people=forget), partition
        )
        if self.forget_name == "forget":
            return values
        return {
            (self.forget_name + key[len("forget") :] if key.startswith("forget_") else key): value
            for key, value in values.items()
        }


class CorpusNLL(MetricSet):
    """Token NLL and perplexity on any data source.

    Keys: ``<split>_<name>`` (mean NLL per label token) and ``<split>_<name>_ppl``.

    Args:
        source: where the text comes from (``TextCorpus``, ``QAPairs``, ``SyntheticKnowledge``...).
        split: which side of the trade-off it measures.
        name: metric name.
        batch_size: evaluation batch size.
    """

    def __init__(
        self, source: DataSource, split: Split = "retain", name: str = "nll", batch_size: int = 16
    ) -> None:
        self.source, self.split, self.name, self.batch_size = source, split, name, batch_size
        self._examples: list[dict[str, torch.Tensor]] = []
        self._pad_id = 0

    data_parallel = True

    def setup(self, tokenizer: Any, max_length: int) -> None:
        self._examples = self.source.checked_build(tokenizer, max_length)
        self._pad_id = tokenizer.pad_token_id

    def compute(self, model: nn.Module, tokenizer: Any, partition: Partition = SINGLE) -> dict[str, float]:
        batches = (
            (pad_examples([self._examples[i] for i in rows], self._pad_id), counted)
            for rows, counted in partition.batches(range(len(self._examples)), self.batch_size)
        )
        total, count = partition.total(token_nll(model, batches))
        nll = total / max(count, 1)
        return {f"{self.split}_{self.name}": nll, f"{self.split}_{self.name}_ppl": math.exp(min(nll, 50.0))}


def choice_logliks(
    model: nn.Module, tokenizer: Any, context: str, continuations: Sequence[str]
) -> list[float]:
    """Summed log-probability of each continuation after ``context`` (BOS + context, no truncation)."""
    ctx = tokenizer(context)["input_ids"]
    rows = []
    for cont in continuations:
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ctx + cont_ids)
        labels = torch.full_like(ids, -100)
        labels[len(ctx) :] = ids[len(ctx) :]
        rows.append({"input_ids": ids, "labels": labels})
    batch = pad_examples(rows, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
    seq_nll, _ = sequence_nll(logits.double(), batch["labels"].to(device))  # double: exact argmax ties
    return (-seq_nll).tolist()


class MultipleChoice(MetricSet):
    """Multiple-choice accuracy by log-likelihood (the lm-eval ``acc`` rule) on WMDP-schema data.

    Records hold a question, a list of choices and the index of the right one (WMDP:
    ``question``, ``choices``, ``answer``). The score of a choice is the summed log-probability of
    ``delimiter + choice`` after the prompt; the prediction is the argmax.

    Key: ``<split>_<name>``.

    Args:
        path: ``.jsonl`` or ``.json`` file.
        split: which side of the trade-off it measures (WMDP: ``forget``; MMLU: ``general``).
        name: metric name.
        template: prompt template with ``{question}``.
        delimiter: put between the prompt and each choice.
        question_field: field of the question.
        choices_field: field of the list of choices.
        answer_field: field of the index of the right choice.
    """

    def __init__(
        self,
        path: str,
        split: Split = "forget",
        name: str = "mc_acc",
        template: str = "{question}",
        delimiter: str = " ",
        question_field: str = "question",
        choices_field: str = "choices",
        answer_field: str = "answer",
    ) -> None:
        self.path, self.split, self.name, self.template, self.delimiter = (
            path,
            split,
            name,
            template,
            delimiter,
        )
        self.fields = (question_field, choices_field, answer_field)
        self._items: list[tuple[str, list[str], int]] = []

    def setup(self, tokenizer: Any, max_length: int) -> None:
        self._items = load_multiple_choice(self.path, *self.fields)

    data_parallel = True

    def compute(self, model: nn.Module, tokenizer: Any, partition: Partition = SINGLE) -> dict[str, float]:
        correct = 0
        for items, counted in partition.batches(self._items, 1):  # one question per forward
            ((question, choices, answer),) = items
            scores = choice_logliks(
                model,
                tokenizer,
                self.template.format(question=question),
                [self.delimiter + c for c in choices],
            )
            correct += counted and int(max(range(len(scores)), key=scores.__getitem__) == answer)
        (total,) = partition.total([correct])
        return {f"{self.split}_{self.name}": total / max(len(self._items), 1)}


def load_multiple_choice(
    path: str, question_field: str = "question", choices_field: str = "choices", answer_field: str = "answer"
) -> list[tuple[str, list[str], int]]:
    """Read and validate WMDP-schema multiple-choice records."""
    records = read_records(path, [question_field])  # names the file and line on bad input
    items = []
    for i, rec in enumerate(records):
        missing = [f for f in (question_field, choices_field, answer_field) if f not in rec]
        if missing:
            raise DataSourceError(f"{path}: record {i}: missing field(s) {missing}")
        choices, answer = rec[choices_field], rec[answer_field]
        if not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataSourceError(
                f"{path}: record {i}: '{answer_field}' must index into the '{choices_field}' list"
            )
        items.append((rec[question_field], [str(c) for c in choices], answer))
    return items
