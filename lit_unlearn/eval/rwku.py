"""RWKU evaluation: greedy answers to the probe questions, scored by ROUGE-L recall.

RWKU (Jin et al. 2024) probes a forgotten target at three levels — 1: fill-in-the-blank, 2: question
answering, 3: adversarial prompts of several types — and its neighbours at levels 1-2 (retention).
Files follow RWKU's layout: a JSON list (or JSON lines) of ``{"query", "answer"}`` records per level,
level-3 records also carrying their ``type``.

Two protocols are implemented, because the published numbers come from two code bases that differ
(the choice changes the scores, so it is recorded with the results):

``official`` (RWKU's own evaluation; the default)
    the user message is the level's instruction and the question; the chat template (instruct
    models) is rendered to text and tokenized again with special tokens, so Llama-3 prompts start
    with BOS twice; ``Answer:`` follows the assistant header; greedy, 30 new tokens, stopping at EOS,
    ``<|eot_id|>`` or a newline token; scored with the ``rouge`` package's ROUGE-L recall
    (case-sensitive, whitespace tokens, no stemming, sentences split at "."; its counts are of
    distinct words), an empty answer scored as the string ``NOANSWER`` (an answer of full stops
    only, on which the package raises, scores 0 instead of stopping the evaluation).
``sago`` (the SAGO paper's port)
    the same instructions with ``Answer:`` at the end of the user message; one BOS; greedy, 32 new
    tokens, the answer cut at the first ``"\n\n"``, ``"\nQuestion"`` or ``"Question:"`` and stripped;
    scored with ``rouge_score``'s ROUGE-L recall (lower-cased, Porter-stemmed); empty answer = 0.

Both report the mean per level and, as ``forget_rougeL`` / ``retain_neighbor_rougeL``, the plain mean
of the level means. Neither code base computes the "All" column of the RWKU and SAGO tables (it is
not the mean of their level columns), so that column cannot be reproduced from them.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from lit_unlearn.data.sources import read_records
from lit_unlearn.errors import UserError
from lit_unlearn.eval.metrics import MetricSet

Protocol = Literal["official", "sago"]
LEVEL_FILES = {
    "forget_level1": "forget_level1.json",
    "forget_level2": "forget_level2.json",
    "forget_level3": "forget_level3.json",
    "neighbor_level1": "neighbor_level1.json",
    "neighbor_level2": "neighbor_level2.json",
}
BLANK = "Please complete the blank in the following question."
BRIEF = "Please briefly answer the following question."
BUDGET = {"official": 30, "sago": 32}
SAGO_STOPS = ["\n\n", "\nQuestion", "Question:"]


def user_message(level: int, query: str, kind: str | None, protocol: Protocol) -> str:
    """The user turn of one probe: the level's instruction and the question (level-3 types
    ``incontext learning`` and ``affirmative suffix`` are laid out differently); the SAGO port
    appends ``Answer:``."""
    if level == 1:
        body = f"{BLANK}\nQuestion: {query}\n"
    elif kind == "incontext learning":
        body = f"{BRIEF}\n{query}\n"
    elif kind == "affirmative suffix" and protocol == "official":
        body = f"{BRIEF}\nQuestion: {query}"
    else:
        body = f"{BRIEF}\nQuestion: {query}\n"
    return body + "Answer:" if protocol == "sago" else body


def build_prompt(
    tokenizer: Any, level: int, query: str, kind: str | None, protocol: Protocol, chat: bool
) -> tuple[str, bool]:
    """The prompt text and whether tokenizing it adds special tokens (BOS).

    With ``chat`` the tokenizer's chat template is rendered to text (it holds BOS for Llama-3):
    the official protocol tokenizes that text with special tokens again (two BOS), the SAGO port
    does not (one). Without a chat template (base models) the message is the prompt, with BOS.
    """
    message = user_message(level, query, kind, protocol)
    suffix = "Answer:" if protocol == "official" else ""
    if not chat:
        return message + suffix, True
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    return text + suffix, protocol == "official"


def score_official(prediction: str, reference: str) -> float:
    """ROUGE-L recall of the ``rouge`` package, as RWKU's evaluation calls it."""
    from rouge import Rouge

    if not reference.strip():
        return 0.0
    try:
        return float(Rouge().get_scores(prediction.strip() or "NOANSWER", reference)[0]["rouge-l"]["r"])
    except ValueError:  # only full stops (e.g. "..."): the package finds no sentence and raises
        return 0.0


@functools.cache
def _stemming_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def score_sago(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``rouge_score`` with stemming, as the SAGO port calls it."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_stemming_scorer().score(reference, prediction)["rougeL"].recall)


SCORERS = {"official": score_official, "sago": score_sago}


def stop_token_ids(tokenizer: Any, protocol: Protocol) -> list[int]:
    """EOS, plus for the official protocol ``<|eot_id|>`` and the single-token newlines ``" \n"``
    and ``"\n"`` where the vocabulary has them."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if protocol == "official":
        vocab = tokenizer.get_vocab()
        if "<|eot_id|>" in vocab:
            ids.append(vocab["<|eot_id|>"])
        for text in (" \n", "\n"):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.append(encoded[0])
    return list(dict.fromkeys(ids))


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    stop_strings: Sequence[str] = ("\n",),
    batch_size: int = 16,
    add_special_tokens: bool = True,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy continuations, batched with left padding; generation ends at any of ``stop_ids``
    (default: EOS) and each answer is cut at the first stop string and stripped."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    eos = list(stop_ids) if stop_ids else tokenizer.eos_token_id
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
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
    """ROUGE-L recall of greedy answers on RWKU forget levels 1-3 and neighbour levels 1-2, under
    the official RWKU protocol or the SAGO port's (see the module docstring for what differs).

    Keys: ``forget_rougeL_level{1,2,3}``, ``forget_rougeL`` (mean of the forget level means),
    ``retain_neighbor_rougeL_level{1,2}``, ``retain_neighbor_rougeL`` (mean of the neighbour level
    means).

    Args:
        directory: folder with RWKU files (``forget_level1.json`` ... ``neighbor_level2.json``);
            missing levels are skipped.
        protocol: ``official`` (RWKU's evaluation) or ``sago`` (the SAGO paper's port).
        chat_template: wrap the question in the tokenizer's chat template (both protocols do for
            instruct models); ``None`` = whenever the tokenizer has one.
        max_new_tokens: generation budget (``None`` = the protocol's: 30 official, 32 SAGO).
        batch_size: generation batch size (both protocols: 16).
        outputs_path: if set, per-item prompts, outputs and scores are written there as JSONL
            after each evaluation.
    """

    def __init__(
        self,
        directory: str,
        protocol: Protocol = "official",
        chat_template: bool | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 16,
        outputs_path: str | None = None,
    ) -> None:
        if protocol not in SCORERS:
            raise UserError(f"RWKU protocol must be one of {sorted(SCORERS)}, got {protocol!r}")
        self.directory, self.protocol, self.chat_template = directory, protocol, chat_template
        self.max_new_tokens = max_new_tokens or BUDGET[protocol]
        self.batch_size, self.outputs_path = batch_size, outputs_path
        self._items: dict[str, list[dict[str, Any]]] = {}
        self._prompts: dict[str, list[str]] = {}
        self._special = True  # whether tokenizing the prompts adds BOS (see build_prompt)
        self._stop_ids: list[int] = []

    def setup(self, tokenizer: Any, max_length: int) -> None:
        for level, name in LEVEL_FILES.items():
            path = os.path.join(self.directory, name)
            if os.path.exists(path):
                self._items[level] = read_records(path, ["query", "answer"])
        if not self._items:
            raise FileNotFoundError(f"RWKU: none of {list(LEVEL_FILES.values())} found in {self.directory}")
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError("RWKU chat_template: true, but the tokenizer has no chat template")
        chat = self.chat_template
        if chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
        # prompts and stops depend on the tokenizer only: built once, used at every evaluation
        for level, items in self._items.items():
            built = [
                build_prompt(tokenizer, int(level[-1]), item["query"], item.get("type"), self.protocol, chat)
                for item in items
            ]
            self._prompts[level] = [text for text, _ in built]
            self._special = built[0][1] if built else True
        self._stop_ids = stop_token_ids(tokenizer, self.protocol)

    def compute(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        results: dict[str, float] = {}
        per_item = []
        score = SCORERS[self.protocol]
        stops = SAGO_STOPS if self.protocol == "sago" else []
        for group, prefix in (("forget", "forget_rougeL"), ("neighbor", "retain_neighbor_rougeL")):
            level_means = []
            for level, items in self._items.items():
                if not level.startswith(group):
                    continue
                prompts = self._prompts[level]
                answers = greedy_generate(
                    model, tokenizer, prompts, self.max_new_tokens, stops, self.batch_size,
                    add_special_tokens=self._special, stop_ids=self._stop_ids,
                )  # fmt: skip
                scores = [score(a, str(it["answer"])) for a, it in zip(answers, items)]
                results[f"{prefix}_{level.split('_')[1]}"] = sum(scores) / len(scores)
                level_means.append(sum(scores) / len(scores))
                per_item += [
                    {"level": level, "type": it.get("type"), "prompt": p, "answer": it["answer"], "output": a,
                     "rougeL_recall": s}
                    for it, p, a, s in zip(items, prompts, answers, scores)
                ]  # fmt: skip
            if level_means:
                results[prefix] = sum(level_means) / len(level_means)
        if self.outputs_path:
            with open(self.outputs_path, "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in per_item)
        return results
