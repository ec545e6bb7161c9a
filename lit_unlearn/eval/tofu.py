"""TOFU (Maini et al. 2024, arXiv 2401.06121): fictitious authors to forget, with the metrics as
open-unlearning computes them.

Per split (``forget``, ``retain``, ``real_authors``, ``world_facts``), every item is a question, its
answer, and for the truth ratio a paraphrased answer and several perturbed (wrong) answers:

- **Q&A probability**: ``exp(−mean NLL of the answer tokens)`` given the question, averaged over
  items; on ``real_authors`` / ``world_facts`` it is normalised against the perturbed answers,
  ``p(answer) / (p(answer) + Σ_k p(perturbed_k) + 1e-10)`` with the same length-normalised ``p``.
- **ROUGE-L recall** of the greedy answer against the answer (``rouge_score``, stemming).
- **Truth ratio** per item: ``exp(−mean_k NLL(perturbed_k)) / (exp(−NLL(correct)) + 1e-10)``, NLLs
  token means, ``correct`` the paraphrased answer on forget/retain and the answer on
  real_authors/world_facts. Aggregated as ``mean(min(tr, 1/tr))`` on forget data (an unlearned
  model cannot tell right from wrong: closer to 1 is better) and ``mean(max(0, 1 − tr))``
  elsewhere (the right answer should win).
- **Forget quality**: the p-value of a two-sample Kolmogorov–Smirnov test between the forget truth
  ratios of the evaluated model and of a *retain model* (trained without the forget authors):
  high = indistinguishable from never having learnt them.
- **Model utility**: the harmonic mean of the nine retain / real_authors / world_facts values.

Prompts: the tokenizer's chat template with the question as the user message when it has one,
else ``"Question: {question}\\nAnswer:"`` with the answer after a space. Answer tokens are scored
without an end-of-sequence token.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lit_unlearn.data.sources import DataSourceError, read_json, read_records
from lit_unlearn.errors import UserError
from lit_unlearn.eval.metrics import MetricSet
from lit_unlearn.eval.rwku import greedy_generate, score_sago
from lit_unlearn.partition import SINGLE, Partition

SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_KEYS = tuple(f"{s}_{m}" for s in SPLITS[1:] for m in ("qa_prob", "qa_rougeL", "truth_ratio"))
"""The nine values whose harmonic mean is the model utility."""
FORGET_SPLITS = ("forget01", "forget05", "forget10")
EPS = 1e-10


def truth_ratios(correct_avg_nll: Sequence[float] | np.ndarray, wrong_avg_nll: Any) -> np.ndarray:
    """Per-item truth ratio ``exp(−mean_k wrong[i, k]) / (exp(−correct[i]) + 1e-10)``.

    Args:
        correct_avg_nll: ``[N]`` token-mean NLL of each item's correct (or paraphrased) answer.
        wrong_avg_nll: ``[N, K]`` token-mean NLLs of its ``K`` perturbed answers.

    >>> truth_ratios([1.0], [[1.0, 1.0]]).round(6).tolist()
    [1.0]
    """
    correct = np.asarray(correct_avg_nll, dtype=np.float64)
    wrong = np.asarray(wrong_avg_nll, dtype=np.float64)
    if wrong.ndim != 2 or wrong.shape[0] != correct.shape[0]:
        raise ValueError(
            f"truth_ratios: expected wrong [N, K] with N = {correct.shape[0]}, got {wrong.shape}"
        )
    return np.exp(-wrong.mean(axis=1)) / (np.exp(-correct) + EPS)


def closer_to_1_better(ratios: Sequence[float] | np.ndarray) -> float:
    """Forget data: ``mean(min(tr, 1/tr))`` — 1 when right and wrong answers are equally likely."""
    tr = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(tr, 1.0 / (tr + EPS))))


def true_better(ratios: Sequence[float] | np.ndarray) -> float:
    """Retained data: ``mean(max(0, 1 − tr))`` — 1 when the right answer is far likelier."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64))))


def forget_quality(
    unlearned_truth_ratios: Sequence[float] | np.ndarray, retain_truth_ratios: Sequence[float] | np.ndarray
) -> float:
    """Two-sample Kolmogorov–Smirnov p-value between the evaluated model's and a retain model's
    forget truth ratios (``scipy.stats.ks_2samp``, two-sided, exact where scipy chooses so)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(unlearned_truth_ratios), np.asarray(retain_truth_ratios)).pvalue)


def model_utility(values: dict[str, float] | Sequence[float]) -> float:
    """Harmonic mean of the values (a mapping: its values); 0 if any is 0."""
    numbers = list(values.values()) if isinstance(values, dict) else list(values)
    if not numbers:
        raise ValueError("model_utility: no values")
    if any(v < 0 or not math.isfinite(v) for v in numbers):
        raise ValueError(f"model_utility: values must be finite and >= 0, got {numbers}")
    if any(v == 0 for v in numbers):
        return 0.0
    return len(numbers) / sum(1.0 / v for v in numbers)


def read_retain_truth_ratios(path: str) -> list[float]:
    """A retain model's per-item forget truth ratios: a JSON list of numbers, an object with a
    ``truth_ratios`` list (what :class:`TOFU` writes), or open-unlearning's evaluation JSON
    (``forget_truth_ratio.value_by_index.<i>.score``)."""
    where = f"TOFU retain_truth_ratios {path}"
    data = read_json(path, where)
    if isinstance(data, dict) and "truth_ratios" in data:
        data = data["truth_ratios"]
    elif isinstance(data, dict) and "forget_truth_ratio" in data:
        by_index = data["forget_truth_ratio"].get("value_by_index", {})
        data = [by_index[k]["score"] for k in sorted(by_index, key=int)]
    if not isinstance(data, list) or not data or not all(isinstance(v, (int, float)) for v in data):
        raise UserError(
            f"{where}: expected a non-empty list of numbers, {{'truth_ratios': [...]}} or open-unlearning's "
            "evaluation JSON with forget_truth_ratio.value_by_index"
        )
    return [float(v) for v in data]


def read_split(path: str, paraphrase: bool) -> list[dict[str, Any]]:
    """TOFU items from ``path``: ``question``, ``answer``, ``perturbed_answer`` (a non-empty list of
    strings, the same length for every item) and, when ``paraphrase``, ``paraphrased_answer``."""
    fields = ["question", "answer", *(["paraphrased_answer"] if paraphrase else [])]
    records = read_records(path, fields)
    width = None
    for i, record in enumerate(records):
        wrong = record.get("perturbed_answer")
        if not isinstance(wrong, list) or not wrong or not all(isinstance(w, str) for w in wrong):
            raise DataSourceError(
                f"{path}: record {i}: 'perturbed_answer' must be a non-empty list of strings"
            )
        if width is not None and len(wrong) != width:
            raise DataSourceError(
                f"{path}: record {i} has {len(wrong)} perturbed answers, the first record {width}"
            )
        width = len(wrong)
    return records


PROMPT = "Question: {question}\nAnswer:"


def format_prompt(tokenizer: Any, question: str, chat: bool, template: str = PROMPT) -> str:
    """The chat template with the question as the user message (its text carries the special
    tokens), or ``template`` filled in (tokenized with them added)."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return template.format(question=question)


@torch.no_grad()
def answer_nll(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    chat: bool,
    batch_size: int = 16,
    max_length: int = 512,
) -> list[float]:
    """Token-mean NLL of each answer given its prompt (right-padded batches of ``batch_size``; the
    prompt is cut from the left when prompt + answer exceed ``max_length``). ``chat``: the prompts
    come from the chat template (special tokens in the text, the answer right after it); otherwise
    special tokens are added and the answer follows a space."""
    device = next(model.parameters()).device
    rows = []
    for prompt, answer in zip(prompts, answers):
        head = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        tail = tokenizer(answer if chat else " " + answer, add_special_tokens=False)["input_ids"]
        if not tail:
            raise DataSourceError(f"TOFU: the answer {answer!r} has no token")
        tail = tail[: max_length - 1]
        head = head[-(max_length - len(tail)) :]
        rows.append((head + tail, len(head)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for i, (row, answer_start) in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
                labels[i, answer_start : len(row)] = torch.tensor(row[answer_start:])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            target = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), target.clamp_min(0), reduction="none"
            ) * (target >= 0)
            out += (nll.sum(1).double() / (target >= 0).sum(1)).tolist()
    finally:
        model.train(was_training)
    return out


class TOFU(MetricSet):
    """The TOFU evaluation of open-unlearning (see the module docstring for every formula).

    Keys: ``{forget,retain,real_authors,world_facts}_{qa_prob,qa_rougeL,truth_ratio}``,
    ``model_utility`` and, with a retain reference, ``forget_quality``.

    Args:
        directory: local copy written by ``scripts/prepare_data.py tofu``: files
            ``<forget_split>_perturbed.json``, ``retain_perturbed.json``,
            ``real_authors_perturbed.json``, ``world_facts_perturbed.json``.
        forget_split: ``forget01``, ``forget05`` or ``forget10``.
        retain_truth_ratios: JSON with a retain model's per-item forget truth ratios (a list, or
            open-unlearning's evaluation JSON of that model) for the forget quality.
        retain_model: a retain model (path or hub id, with the same tokenizer) whose forget truth
            ratios are computed once, at the first evaluation; an alternative to
            ``retain_truth_ratios``.
        chat_template: use the tokenizer's chat template; ``None`` = whenever it has one.
        max_new_tokens: generation budget for the ROUGE answers (open-unlearning: 200).
        batch_size: items per forward pass and per generation batch.
        prompt_template: the prompt without a chat template (``{question}`` is replaced); the
            answer follows after a space.
        truth_ratios_path: write the forget truth ratios there (``{"truth_ratios": [...]}``) after
            each evaluation: the file a retain model's run provides as ``retain_truth_ratios``.
    """

    data_parallel = True

    def __init__(
        self,
        directory: str,
        forget_split: str = "forget10",
        retain_truth_ratios: str | None = None,
        retain_model: str | None = None,
        chat_template: bool | None = None,
        max_new_tokens: int = 200,
        batch_size: int = 16,
        truth_ratios_path: str | None = None,
        prompt_template: str = PROMPT,
    ) -> None:
        if "{question}" not in prompt_template:
            raise UserError(f"TOFU prompt_template must contain {{question}}, got {prompt_template!r}")
        if forget_split not in FORGET_SPLITS:
            raise UserError(f"TOFU forget_split must be one of {list(FORGET_SPLITS)}, got {forget_split!r}")
        if retain_truth_ratios and retain_model:
            raise UserError("TOFU: give retain_truth_ratios or retain_model, not both")
        self.directory, self.forget_split = directory, forget_split
        self.retain_truth_ratios_path, self.retain_model = retain_truth_ratios, retain_model
        self.chat_template, self.max_new_tokens, self.batch_size = chat_template, max_new_tokens, batch_size
        self.truth_ratios_path, self.prompt_template = truth_ratios_path, prompt_template
        self._items: dict[str, list[dict[str, Any]]] = {}
        self._reference: list[float] | None = None
        self._chat = False
        self._max_length = 512

    def files(self) -> dict[str, str]:
        names = {"forget": f"{self.forget_split}_perturbed.json"}
        names.update({s: f"{s}_perturbed.json" for s in SPLITS[1:]})
        return {split: os.path.join(self.directory, name) for split, name in names.items()}

    def load_items(self) -> dict[str, list[dict[str, Any]]]:
        """Every split's items (read from :meth:`files`)."""
        items = {}
        for split, path in self.files().items():
            if not os.path.exists(path):
                raise UserError(
                    f"TOFU directory {self.directory}: {os.path.basename(path)} is missing "
                    "(write the local copy with: python scripts/prepare_data.py tofu --out DIR)"
                )
            items[split] = read_split(path, paraphrase=split in ("forget", "retain"))
        return items

    def setup(self, tokenizer: Any, max_length: int) -> None:
        self._items = self.load_items()
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError("TOFU chat_template: true, but the tokenizer has no chat template")
        self._chat = (
            bool(getattr(tokenizer, "chat_template", None))
            if self.chat_template is None
            else self.chat_template
        )
        self._max_length = max_length
        if self.retain_model:  # a missing path or an unreachable hub id fails now, not after step 0
            from lit_unlearn.models import check_model_path

            check_model_path(self.retain_model, flag="TOFU retain_model")
        if self.retain_truth_ratios_path:
            self._reference = read_retain_truth_ratios(self.retain_truth_ratios_path)
            if len(self._reference) != len(self._items["forget"]):
                raise UserError(
                    f"TOFU retain_truth_ratios {self.retain_truth_ratios_path}: {len(self._reference)} values "
                    f"for {len(self._items['forget'])} {self.forget_split} items"
                )

    def _nll(self, model: nn.Module, tokenizer: Any, prompts: list[str], answers: list[str]) -> list[float]:
        return answer_nll(model, tokenizer, prompts, answers, self._chat, self.batch_size, self._max_length)

    def _scores(
        self, model: nn.Module, tokenizer: Any, split: str, partition: Partition, generate: bool = True
    ) -> list[dict[str, Any]]:
        """Per item (this process's share, then gathered in order): NLLs and the ROUGE recall."""
        items = self._items[split]
        mine: list[dict[str, Any]] = []
        for indices, counted in partition.whole_batches(range(len(items)), self.batch_size):
            batch = [items[i] for i in indices]
            prompts = [
                format_prompt(tokenizer, it["question"], self._chat, self.prompt_template) for it in batch
            ]
            correct = self._nll(model, tokenizer, prompts, [it["answer"] for it in batch])
            para = (
                self._nll(model, tokenizer, prompts, [it["paraphrased_answer"] for it in batch])
                if "paraphrased_answer" in batch[0] and split in ("forget", "retain")
                else correct
            )
            # one forward per perturbed answer index: every batch runs as many forwards (a sharded
            # model's forwards are collectives, and the last batch may be shorter)
            wrong = [
                self._nll(model, tokenizer, prompts, [it["perturbed_answer"][k] for it in batch])
                for k in range(len(batch[0]["perturbed_answer"]))
            ]
            rouge = [0.0] * len(batch)
            if generate:
                outputs = greedy_generate(
                    model, tokenizer, prompts, self.max_new_tokens, (), len(batch),
                    add_special_tokens=not self._chat, synced=partition.synced,
                )  # fmt: skip
                rouge = [score_sago(o, it["answer"]) for o, it in zip(outputs, batch)]
            if counted:
                mine += [
                    {"correct": c, "para": p, "wrong": [w[j] for w in wrong], "rouge": r}
                    for j, (c, p, r) in enumerate(zip(correct, para, rouge))
                ]
        return partition.concatenate(mine)

    def compute(self, model: nn.Module, tokenizer: Any, partition: Partition = SINGLE) -> dict[str, float]:
        results: dict[str, float] = {}
        forget_ratios: np.ndarray | None = None
        for split in SPLITS:
            rows = self._scores(model, tokenizer, split, partition)
            correct = np.array([r["correct"] for r in rows])
            wrong = np.array([r["wrong"] for r in rows])
            if split in ("forget", "retain"):
                results[f"{split}_qa_prob"] = float(np.mean(np.exp(-correct)))
                ratios = truth_ratios([r["para"] for r in rows], wrong)
            else:
                p_correct, p_wrong = np.exp(-correct), np.exp(-wrong).sum(axis=1)
                results[f"{split}_qa_prob"] = float(np.mean(p_correct / (p_correct + p_wrong + EPS)))
                ratios = truth_ratios(correct, wrong)
            results[f"{split}_qa_rougeL"] = float(np.mean([r["rouge"] for r in rows]))
            if split == "forget":
                forget_ratios = ratios
                results["forget_truth_ratio"] = closer_to_1_better(ratios)
            else:
                results[f"{split}_truth_ratio"] = true_better(ratios)
        assert forget_ratios is not None
        results["model_utility"] = model_utility({k: results[k] for k in UTILITY_KEYS})
        reference = self._retain_reference(model, tokenizer, partition)
        if reference is not None:
            results["forget_quality"] = forget_quality(forget_ratios, reference)
        if self.truth_ratios_path and partition.rank == 0:
            with open(self.truth_ratios_path, "w") as handle:
                json.dump({"forget_split": self.forget_split, "truth_ratios": forget_ratios.tolist()}, handle)
        return results

    def _retain_reference(self, model: nn.Module, tokenizer: Any, partition: Partition) -> list[float] | None:
        if self._reference is None and self.retain_model:
            from lit_unlearn.models import load_reference_lm

            reference = load_reference_lm(self.retain_model, like=model)
            rows = self._scores(reference, tokenizer, "forget", partition, generate=False)
            self._reference = truth_ratios([r["para"] for r in rows], [r["wrong"] for r in rows]).tolist()
            del reference
        return self._reference


class SyntheticTOFU(TOFU):
    """TOFU's metrics on the embedded benchmark, with its retrain oracle as the retain model.

    The views: ``forget`` = the forget people's questions, ``retain`` = the other people's,
    ``real_authors`` = the other people's statements, ``world_facts`` = the arithmetic probes (up to
    ``max_items`` each, in corpus order). Answers are one word, so the paraphrase is the answer
    itself; the perturbed answers are other values of the same attribute (other sums for
    arithmetic). Prompts are the probes' own (no ``Question:`` wrapper).

    Args:
        num_people: corpus size (must match the target).
        forget_fraction: share of forget people (must match the target).
        seed: corpus seed (must match the target).
        retain_model: the retain model (default: the retrain oracle, built on first use, about a
            minute on CPU).
        retain_truth_ratios: or its truth ratios (a JSON file), instead of ``retain_model``.
        perturbed: wrong answers per item.
        max_items: items per split at most.
        max_new_tokens: greedy answer length for ROUGE.
        batch_size: items per forward pass.
        truth_ratios_path: write this model's forget truth ratios there after each evaluation.
    """

    def __init__(
        self,
        num_people: int = 200,
        forget_fraction: float = 0.1,
        seed: int = 0,
        retain_model: str | None = "synthetic://oracle",
        retain_truth_ratios: str | None = None,
        perturbed: int = 3,
        max_items: int = 200,
        max_new_tokens: int = 2,
        batch_size: int = 64,
        truth_ratios_path: str | None = None,
    ) -> None:
        super().__init__(
            directory="", forget_split="forget10", retain_truth_ratios=retain_truth_ratios,
            retain_model=None if retain_truth_ratios else retain_model, chat_template=False,
            max_new_tokens=max_new_tokens, batch_size=batch_size, truth_ratios_path=truth_ratios_path,
            prompt_template="{question}",
        )  # fmt: skip
        self.num_people, self.forget_fraction, self.seed = num_people, forget_fraction, seed
        self.perturbed, self.max_items = perturbed, max_items

    def load_items(self) -> dict[str, list[dict[str, Any]]]:
        from lit_unlearn.benchmarks.synthetic.corpus import VALUES, generate_corpus

        corpus = generate_corpus(self.num_people, self.forget_fraction, self.seed)

        def item(probe: Any) -> dict[str, Any]:
            if probe.kind == "arithmetic":
                total = int(probe.answer)
                wrong = [str(total + d) for d in (1, -1, 2, -2, 3, -3) if total + d >= 0]
            else:
                wrong = [v for v in VALUES[probe.attribute] if v != probe.answer]
            return {
                "question": probe.prompt, "answer": probe.answer, "paraphrased_answer": probe.answer,
                "perturbed_answer": wrong[: self.perturbed],
            }  # fmt: skip

        views = {
            "forget": corpus.probes_for("qa", corpus.forget_people),
            "retain": corpus.probes_for("qa", corpus.retain_people),
            "real_authors": corpus.probes_for("statement", corpus.retain_people),
            "world_facts": corpus.probes_for("arithmetic"),
        }
        return {split: [item(p) for p in probes[: self.max_items]] for split, probes in views.items()}
