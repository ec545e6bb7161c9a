"""MUSE (Shi et al. 2024, arXiv 2407.06460): unlearning news articles (``News``: BBC news) or books
(``Books``: the Harry Potter series) from a model fine-tuned on them, scored the way
open-unlearning scores it.

- **VerbMem** (``forget_verbmem_rougeL``): each forget text is cut into a prefix (``prompt``) and its
  true continuation (``gt``); the model continues the prefix greedily (128 new tokens, stopping at
  EOS) and the continuation is scored by ROUGE-L F1 against ``gt``. Verbatim memorisation: lower
  after unlearning.
- **KnowMem** (``forget_knowmem_rougeL``, ``retain_knowmem_rougeL``): questions about the forget
  texts and about the retain texts, each preceded by its split's in-context examples as earlier
  question/answer turns; greedy answers (32 new tokens, cut at ``"\\n\\n"``, ``"\\nQuestion"`` or
  ``"Question:"``) scored by ROUGE-L F1 against the answer. Knowledge of the forget texts should
  fall; knowledge of the retain texts is MUSE's **utility preservation** and should stay.
- **PrivLeak** (``privleak``): a membership-inference attack's AUC of forget texts against holdout
  texts (same distribution, never trained on), for the evaluated model (``privleak_auc``) and for
  a *retain model* trained without the forget texts (``privleak_reference_auc``):
  ``(AUC_ref − AUC) / (1 − AUC_ref) × 100``, with AUC = P(a forget text looks more familiar than a
  holdout text). 0: the forget texts leak as little as for a model that never saw them; −100: the
  target model (the AUC near 1); large positive: over-unlearning (the forget texts now stand out as
  unfamiliar, itself a leak). This is open-unlearning's ``(s − r) / r × 100`` on ``s = 1 − AUC``.

ROUGE-L F1 is ``rouge_score``'s, with stemming (lower-cased words). Prompts without a chat template
are ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per example and ``"Question: {q}\\nAnswer: "`` for the
question, tokenized with BOS; with one, the examples are earlier user/assistant turns.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from lit_unlearn.data.sources import read_json, read_records
from lit_unlearn.errors import UserError
from lit_unlearn.eval.metrics import MetricSet
from lit_unlearn.eval.mia import ATTACKS, MembershipInference
from lit_unlearn.eval.rwku import SAGO_STOPS, shared_greedy, stemming_scorer, stop_token_ids
from lit_unlearn.partition import SINGLE, Partition

log = logging.getLogger(__name__)

FILES = {
    "verbmem": "verbmem_forget.json",
    "forget_qa": "knowmem_forget_qa.json",
    "forget_qa_icl": "knowmem_forget_qa_icl.json",
    "retain_qa": "knowmem_retain_qa.json",
    "retain_qa_icl": "knowmem_retain_qa_icl.json",
    "privleak_forget": "privleak_forget.json",
    "privleak_holdout": "privleak_holdout.json",
}
"""The evaluation files of one corpus, as ``scripts/prepare_data.py muse`` writes them."""
OPEN_UNLEARNING_KEYS = {
    "loss": "mia_loss",
    "zlib": "mia_zlib",
    "mink": "mia_min_k",
    "minkpp": "mia_min_k_plus_plus",
}
"""Where open-unlearning's evaluation JSON keeps each attack's forget-vs-holdout AUC."""
EPS = 1e-10


def privleak(auc: float, reference_auc: float) -> float:
    """PrivLeak in percent: ``(reference_auc − auc) / (1 − reference_auc + 1e-10) × 100``.

    Args:
        auc: the evaluated model's forget-vs-holdout AUC (1 = forget texts far more familiar).
        reference_auc: the same AUC of a retain model.

    >>> round(privleak(1.0, 0.5), 6), privleak(0.5, 0.5)
    (-100.0, 0.0)
    """
    return (reference_auc - auc) / (1.0 - reference_auc + EPS) * 100.0


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``rouge_score`` with stemming (0 for an empty prediction)."""
    return float(stemming_scorer().score(reference, prediction)["rougeL"].fmeasure)


def knowmem_prompt(tokenizer: Any, examples: Sequence[dict[str, Any]], question: str, chat: bool) -> str:
    """The KnowMem prompt: the in-context ``examples`` (``question``/``answer`` records) as earlier
    turns, then ``question``. Without ``chat`` the text is tokenized with BOS; with it, the text is
    the rendered chat template (special tokens included)."""
    if chat:
        messages = []
        for example in examples:
            messages += [
                {"role": "user", "content": example["question"]},
                {"role": "assistant", "content": str(example["answer"])},
            ]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shots = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
    return f"{shots}Question: {question}\nAnswer: "


def read_reference_auc(path: str, attack: str) -> float:
    """A retain model's forget-vs-holdout AUC from a JSON file: open-unlearning's evaluation JSON
    (``mia_min_k_plus_plus.agg_value`` for ``minkpp``, ``mia_min_k`` for ``mink``, ...), the output
    of ``lit-unlearn-eval --metrics MUSE`` (``MUSE.privleak_auc``), or an object with
    ``privleak_auc``."""
    where = f"MUSE retain_logs {path}"
    data = read_json(path, where)
    candidates = []
    if isinstance(data, dict):
        entry = data.get(OPEN_UNLEARNING_KEYS[attack])
        candidates += [entry.get("agg_value") if isinstance(entry, dict) else None, data.get("privleak_auc")]
        muse = data.get("MUSE")
        candidates.append(muse.get("privleak_auc") if isinstance(muse, dict) else None)
    value = next((v for v in candidates if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    if value is None or not 0.0 <= value <= 1.0:
        raise UserError(
            f"{where}: expected an AUC in [0, 1] under {OPEN_UNLEARNING_KEYS[attack]}.agg_value "
            "(open-unlearning's evaluation JSON), MUSE.privleak_auc (lit-unlearn-eval's output) or privleak_auc"
        )
    return float(value)


class MUSE(MetricSet):
    """The MUSE evaluation of open-unlearning: VerbMem, KnowMem on forget and retain (utility
    preservation) and PrivLeak (see the module docstring for every formula).

    Keys: ``forget_verbmem_rougeL``, ``forget_knowmem_rougeL``, ``retain_knowmem_rougeL``,
    ``privleak``, ``privleak_auc`` (this model's AUC), ``privleak_reference_auc`` (the retain
    model's).

    Args:
        directory: local copy of one corpus written by ``scripts/prepare_data.py muse`` (e.g.
            ``data/muse/news``): ``verbmem_forget.json`` (``prompt``, ``gt``),
            ``knowmem_{forget,retain}_qa[_icl].json`` (``question``, ``answer``),
            ``privleak_{forget,holdout}.json`` (``text``).
        retain_model: the retain model for PrivLeak (path or hub id, with the same tokenizer; MUSE
            publishes ``muse-bench/MUSE-News_retrain``), scored once at the first evaluation.
        retain_logs: or a JSON file with its AUC: open-unlearning's evaluation JSON of the retain
            model, or ``lit-unlearn-eval``'s output for it.
        retain_auc: or the AUC itself. With no reference PrivLeak is taken against 0.5 (what an
            ideal retain model scores; open-unlearning's fallback) and a warning says so.
        attack: the membership-inference attack of PrivLeak: ``minkpp`` (Min-K%++), ``mink``
            (Min-K%: the MUSE paper's and open-unlearning's published PrivLeak), ``loss`` or ``zlib``.
        k: the fraction of least likely tokens for Min-K% and Min-K%++ (MUSE: 0.4).
        max_tokens: PrivLeak scores the first N tokens of each text (MUSE: 2048).
        chat_template: wrap KnowMem questions in the tokenizer's chat template (MUSE's target
            models are base models: off).
        verbmem_new_tokens: VerbMem continuation length (MUSE: 128).
        knowmem_new_tokens: KnowMem answer length (MUSE: 32).
        verbmem_batch_size: VerbMem generation batch (open-unlearning: 8).
        knowmem_batch_size: KnowMem generation batch (open-unlearning: 16).
        max_items: use only the first N items of each file (``None`` = all, as published).
        outputs_path: if set, per-item prompts, outputs and scores are written there as JSONL after
            each evaluation.

    Data-parallel: under DDP or FSDP each process generates its share of the one-process batches
    and scores its share of the PrivLeak texts; the sums are added.
    """

    data_parallel = True
    verbmem_stops: tuple[str, ...] = ()
    """Strings that end a VerbMem continuation early (MUSE: none; it runs to EOS or the budget)."""

    def __init__(
        self,
        directory: str,
        retain_model: str | None = None,
        retain_logs: str | None = None,
        retain_auc: float | None = None,
        attack: str = "minkpp",
        k: float = 0.4,
        max_tokens: int | None = 2048,
        chat_template: bool = False,
        verbmem_new_tokens: int = 128,
        knowmem_new_tokens: int = 32,
        verbmem_batch_size: int = 8,
        knowmem_batch_size: int = 16,
        max_items: int | None = None,
        outputs_path: str | None = None,
    ) -> None:
        if attack not in ATTACKS:
            raise UserError(f"MUSE attack must be one of {list(ATTACKS)}, got {attack!r}")
        given = [name for name, v in (("retain_model", retain_model), ("retain_logs", retain_logs),
                                      ("retain_auc", retain_auc)) if v is not None]  # fmt: skip
        if len(given) > 1:
            raise UserError(f"MUSE: give one PrivLeak reference, not {' and '.join(given)}")
        if retain_auc is not None and not 0.0 <= retain_auc <= 1.0:
            raise UserError(f"MUSE retain_auc must be in [0, 1], got {retain_auc}")
        self.directory, self.attack, self.chat_template = directory, attack, chat_template
        self.retain_model, self.retain_logs, self.retain_auc = retain_model, retain_logs, retain_auc
        self.new_tokens = {"verbmem": verbmem_new_tokens, "knowmem": knowmem_new_tokens}
        self.batch_size = {"verbmem": verbmem_batch_size, "knowmem": knowmem_batch_size}
        self.max_items, self.outputs_path = max_items, outputs_path
        self._mia = MembershipInference(
            forget=os.path.join(directory, FILES["privleak_forget"]),
            holdout=os.path.join(directory, FILES["privleak_holdout"]),
            k=k,
            max_texts=max_items,
            max_tokens=max_tokens,
        )
        self._tasks: dict[str, tuple[list[str], list[str]]] = {}  # task -> (prompts, references)
        self._chat = False
        self._reference: float | None = retain_auc

    def _read(self, name: str, fields: list[str]) -> list[dict[str, Any]]:
        path = os.path.join(self.directory, FILES[name])
        if not os.path.exists(path):
            raise UserError(
                f"MUSE directory {self.directory}: {FILES[name]} is missing "
                "(write the local copy with: python scripts/prepare_data.py muse --out DIR)"
            )
        records = read_records(path, fields)
        if not records:
            raise UserError(f"MUSE {path}: no record")
        return records[: self.max_items] if self.max_items and not name.endswith("_icl") else records

    def load_tasks(self, tokenizer: Any) -> dict[str, tuple[list[str], list[str]]]:
        """The prompts and references of each generation task (``forget_verbmem``,
        ``forget_knowmem``, ``retain_knowmem``), read from :attr:`directory`."""
        verbmem = self._read("verbmem", ["prompt", "gt"])
        tasks = {"forget_verbmem": ([r["prompt"] for r in verbmem], [str(r["gt"]) for r in verbmem])}
        for split in ("forget", "retain"):
            examples = self._read(f"{split}_qa_icl", ["question", "answer"])
            items = self._read(f"{split}_qa", ["question", "answer"])
            prompts = [knowmem_prompt(tokenizer, examples, it["question"], self._chat) for it in items]
            tasks[f"{split}_knowmem"] = (prompts, [str(it["answer"]) for it in items])
        for name in ("privleak_forget", "privleak_holdout"):
            self._read(name, ["text"])  # a missing file: the same one line as the others
        return tasks

    def setup(self, tokenizer: Any, max_length: int) -> None:
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError("MUSE chat_template: true, but the tokenizer has no chat template")
        self._chat = self.chat_template
        self._tasks = self.load_tasks(tokenizer)
        self._mia.setup(tokenizer, max_length)
        if self.retain_model:  # a missing path or an unreachable hub id fails now, not after step 0
            from lit_unlearn.models import check_model_path

            check_model_path(self.retain_model, flag="MUSE retain_model")
        if self.retain_logs:
            self._reference = read_reference_auc(self.retain_logs, self.attack)
        if self.retain_model is None and self._reference is None:
            log.warning(
                "MUSE: no retain model, retain_logs or retain_auc: PrivLeak is taken against an AUC of 0.5"
            )

    def _generate(
        self, model: nn.Module, tokenizer: Any, task: str, partition: Partition
    ) -> list[tuple[int, str, float]]:
        """(item, output, ROUGE-L F1) of every item, gathered in order."""
        prompts, references = self._tasks[task]
        kind = task.split("_")[1]
        stops = SAGO_STOPS if kind == "knowmem" else list(self.verbmem_stops)
        # generation ends at the tokenizer's EOS and at every EOS id of the model's generation config
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop_ids = stop_token_ids(tokenizer, "sago", config_eos)
        outputs = shared_greedy(
            model, tokenizer, prompts, partition, self.batch_size[kind], max_new_tokens=self.new_tokens[kind],
            stop_strings=stops, add_special_tokens=not self._chat, stop_ids=stop_ids,
        )  # fmt: skip
        return partition.concatenate([(i, o, rouge_l_f1(o, references[i])) for i, o in outputs])

    def _auc(self, model: nn.Module, tokenizer: Any, partition: Partition) -> float:
        return self._mia.compute(model, tokenizer, partition)[f"forget_mia_{self.attack}_auc"]

    def compute(self, model: nn.Module, tokenizer: Any, partition: Partition = SINGLE) -> dict[str, float]:
        results: dict[str, float] = {}
        per_item = []
        for task in self._tasks:
            rows = self._generate(model, tokenizer, task, partition)
            results[f"{task}_rougeL"] = math.fsum(s for _, _, s in rows) / len(rows)
            prompts, references = self._tasks[task]
            per_item += [
                {"task": task, "prompt": prompts[i], "reference": references[i], "output": o, "rougeL_f1": s}
                for i, o, s in rows
            ]
        auc = self._auc(model, tokenizer, partition)
        reference = self._retain_reference(model, tokenizer, partition)
        results.update(
            privleak=privleak(auc, 0.5 if reference is None else reference),
            privleak_auc=auc,
            privleak_reference_auc=0.5 if reference is None else reference,
        )
        if self.outputs_path and partition.rank == 0:
            with open(self.outputs_path + ".tmp", "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in per_item)
            os.replace(self.outputs_path + ".tmp", self.outputs_path)  # never a half-written file
        return results

    def _retain_reference(self, model: nn.Module, tokenizer: Any, partition: Partition) -> float | None:
        if self._reference is None and self.retain_model:
            from lit_unlearn.models import load_reference_lm

            reference = load_reference_lm(self.retain_model, like=model)
            self._reference = self._auc(reference, tokenizer, partition)
            del reference
        return self._reference


class SyntheticMUSE(MUSE):
    """MUSE's metrics on the embedded benchmark, with its retrain oracle as the retain model.

    VerbMem: each forget person's document cut before its first attribute value (the prompt) and
    the rest of it (the continuation to reproduce). KnowMem: the forget people's questions, and the
    other people's (utility preservation), in the probes' own format (no ``Question:`` wrapper and
    no in-context examples: the embedded vocabulary has neither). PrivLeak: the forget documents
    against the membership holdout of :class:`~lit_unlearn.eval.SyntheticMembership` (the same
    documents carrying other forget people's values: in-vocabulary texts never trained on).

    Args:
        num_people: corpus size (must match the target).
        forget_fraction: share of forget people (must match the target).
        seed: corpus seed (must match the target).
        retain_model: the retain model (default: the retrain oracle, built on first use, about a
            minute on CPU).
        retain_auc: or its AUC, instead of ``retain_model``.
        attack: the membership-inference attack of PrivLeak (``minkpp``, ``mink``, ``loss``, ``zlib``).
        k: the fraction of least likely tokens for Min-K% and Min-K%++.
        verbmem_new_tokens: continuation length.
        knowmem_new_tokens: answer length (the answers are one word).
        batch_size: generation batch.
        max_items: items per task and texts per PrivLeak set at most.
    """

    verbmem_stops = (".",)  # a document is one sentence: its continuation ends at the full stop

    def __init__(
        self,
        num_people: int = 200,
        forget_fraction: float = 0.1,
        seed: int = 0,
        retain_model: str | None = "synthetic://oracle",
        retain_auc: float | None = None,
        attack: str = "minkpp",
        k: float = 0.4,
        verbmem_new_tokens: int = 16,
        knowmem_new_tokens: int = 1,
        batch_size: int = 64,
        max_items: int | None = 200,
    ) -> None:
        super().__init__(
            directory="", retain_model=None if retain_auc is not None else retain_model, retain_auc=retain_auc,
            attack=attack, k=k, max_tokens=None, verbmem_new_tokens=verbmem_new_tokens,
            knowmem_new_tokens=knowmem_new_tokens, verbmem_batch_size=batch_size, knowmem_batch_size=batch_size,
            max_items=max_items,
        )  # fmt: skip
        from lit_unlearn.eval.mia import SyntheticMembership

        self.num_people, self.forget_fraction, self.seed = num_people, forget_fraction, seed
        self._mia = SyntheticMembership(num_people, forget_fraction, seed, k=k, max_texts=max_items)

    def load_tasks(self, tokenizer: Any) -> dict[str, tuple[list[str], list[str]]]:
        from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus

        corpus = generate_corpus(self.num_people, self.forget_fraction, self.seed)
        cut = slice(0, self.max_items)
        prompts, continuations = [], []
        for doc in corpus.person_docs(corpus.forget_people)[cut]:
            words, first = doc.text.split(), doc.value_positions[0]
            prompts.append(" ".join(words[:first]))
            continuations.append(" ".join(words[first:]))
        tasks = {"forget_verbmem": (prompts, continuations)}
        for split, people in (("forget", corpus.forget_people), ("retain", corpus.retain_people)):
            probes = corpus.probes_for("qa", people)[cut]
            tasks[f"{split}_knowmem"] = ([p.prompt for p in probes], [p.answer for p in probes])
        return tasks
