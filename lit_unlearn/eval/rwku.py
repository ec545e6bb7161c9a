"""RWKU evaluation: greedy answers to the probe questions, scored by ROUGE-L recall.

RWKU (Jin et al. 2024) probes a forgotten target at three levels — 1: fill-in-the-blank, 2: question
answering, 3: adversarial prompts of several types — and its neighbours at levels 1-2 (retention).
Files follow RWKU's layout: a JSON list (or JSON lines) of ``{"query", "answer"}`` records per level,
level-3 records also carrying their ``type``.

Two protocols are implemented, because the published numbers come from two code bases that differ
(the choice changes the scores, so it is recorded with the results):

``official`` (RWKU's own evaluation; its leaderboard's numbers)
    the user message is the level's instruction and the question; the chat template (instruct
    models) is rendered to text and tokenized again with special tokens, so Llama-3 prompts start
    with BOS twice; ``Answer:`` follows the assistant header, except for level-3 "affirmative
    suffix" probes (whose body also loses its final newline); greedy, 30 new tokens, stopping at
    EOS, ``<|eot_id|>`` or the vocabulary entries named literally ``" \n"`` and ``"\n"`` — RWKU
    looks these up with ``convert_tokens_to_ids``, which finds nothing in a byte-level vocabulary
    such as Llama-3's (newline is stored as ``"Ċ"``), so there the answer runs to EOS,
    ``<|eot_id|>`` or the budget and is *not* cut at a newline; scored with the ``rouge`` package's ROUGE-L recall
    (case-sensitive, whitespace tokens, no stemming, sentences split at "."; its counts are of
    distinct words), an empty answer scored as the string ``NOANSWER`` (an answer of full stops
    only, on which the package raises, scores 0 instead of stopping the evaluation).
``sago`` (the SAGO paper's port; the paper's RWKU numbers, and ``configs/benchmark/rwku.yaml``)
    the same instructions with ``Answer:`` at the end of the user message (not for "affirmative
    suffix" probes, which keep their final newline); one BOS; greedy, 32 new tokens, stopping at
    EOS, the answer cut at the first ``"\n\n"``, ``"\nQuestion"`` or ``"Question:"`` and stripped;
    scored with ``rouge_score``'s ROUGE-L recall (lower-cased, Porter-stemmed); empty answer = 0.

Under both, generation also stops at every EOS id of the model's generation config (Llama-3
Instruct: 128001 and 128009), so the stops do not depend on which tokenizer revision names which
token as EOS.

Both report the mean per level, the plain mean of the level means (``forget_rougeL`` /
``retain_neighbor_rougeL``) and the probe-weighted mean over all probes (``..._all``). Neither code
base computes the "All" column of the RWKU and SAGO tables; RWKU's Table 1 matches the
probe-weighted mean (forget 85.9/76.4/77.7 over 3,268/2,879/6,984 probes gives 79.5, the table
79.6; the mean of the levels would be 80.0).
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
from lit_unlearn.partition import SINGLE, Partition

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


AFFIRMATIVE = "affirmative suffix"


def user_message(level: int, query: str, kind: str | None, protocol: Protocol) -> str:
    """The user turn of one probe: the level's instruction and the question (level-3 types
    ``incontext learning`` and ``affirmative suffix`` are laid out differently); the SAGO port
    appends ``Answer:`` (not to an affirmative-suffix probe, whose query already ends in the
    start of an answer)."""
    if level == 1:
        body = f"{BLANK}\nQuestion: {query}\n"
    elif kind == "incontext learning":
        body = f"{BRIEF}\n{query}\n"
    elif kind == AFFIRMATIVE and protocol == "official":
        body = f"{BRIEF}\nQuestion: {query}"
    else:
        body = f"{BRIEF}\nQuestion: {query}\n"
    return body + "Answer:" if protocol == "sago" and kind != AFFIRMATIVE else body


def build_prompt(
    tokenizer: Any, level: int, query: str, kind: str | None, protocol: Protocol, chat: bool
) -> tuple[str, bool]:
    """The prompt text and whether tokenizing it adds special tokens (BOS).

    With ``chat`` the tokenizer's chat template is rendered to text (it holds BOS for Llama-3):
    the official protocol tokenizes that text with special tokens again (two BOS), the SAGO port
    does not (one). Without a chat template (base models) the message is the prompt, with BOS.
    """
    message = user_message(level, query, kind, protocol)
    suffix = "Answer:" if protocol == "official" and kind != AFFIRMATIVE else ""
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
def stemming_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def score_sago(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``rouge_score`` with stemming, as the SAGO port calls it."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(stemming_scorer().score(reference, prediction)["rougeL"].recall)


SCORERS = {"official": score_official, "sago": score_sago}


def stop_token_ids(
    tokenizer: Any, protocol: Protocol, generation_eos: int | Sequence[int] | None = None
) -> list[int]:
    """Token ids that end an answer: the model's generation-config EOS ids (``generation_eos``),
    the tokenizer's EOS and, for the official protocol, what RWKU's code adds: the vocabulary
    entries named ``<|eot_id|>``, ``" \n"`` and ``"\n"``, looked up as RWKU does with
    ``convert_tokens_to_ids`` (a vocabulary lookup of the literal string, not an encoding; absent
    entries add nothing, so a byte-level vocabulary gets no newline stop)."""
    if isinstance(generation_eos, int):
        generation_eos = [generation_eos]
    ids = list(generation_eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if protocol == "official":
        for token in ("<|eot_id|>", " \n", "\n"):
            found = tokenizer.convert_tokens_to_ids(token)
            if isinstance(found, int):
                ids.append(found)
    return list(dict.fromkeys(int(i) for i in ids))


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
    synced: bool = False,
) -> list[str]:
    """Greedy continuations, batched with left padding; generation ends at any of ``stop_ids``
    (default: EOS), each answer ends before its first stop id and is cut at the first stop string
    and stripped. ``synced``: the model is sharded over the processes (every forward pass is a
    collective), so each process keeps stepping until all have finished their batch."""
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
                synced_gpus=synced,
            )
            stop_set = set(eos) if isinstance(eos, list) else {eos}
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():
                # the answer ends before its first stop id, as RWKU cuts it: a stop that is an
                # ordinary token (a literal newline entry, a generation-config EOS) is not text
                cut = next((i for i, token in enumerate(row) if token in stop_set), len(row))
                text = tokenizer.decode(row[:cut], skip_special_tokens=True)
                for stop in stop_strings:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                outputs.append(text.strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def shared_greedy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    partition: Partition,
    batch_size: int,
    **options: Any,
) -> list[tuple[int, str]]:
    """This process's ``(index, answer)`` pairs of :func:`greedy_generate`: it answers its share of
    the one-process batches (so every prompt is padded, and answered, as in one process); under a
    sharded model it also runs the lockstep's dummy batches and drops their answers. ``options``:
    the other arguments of :func:`greedy_generate`."""
    mine: list[tuple[int, str]] = []
    for indices, counted in partition.whole_batches(range(len(prompts)), batch_size):
        answers = greedy_generate(
            model,
            tokenizer,
            [prompts[i] for i in indices],
            batch_size=len(indices),
            synced=partition.synced,
            **options,
        )
        if counted:
            mine += list(zip(indices, answers))
    return mine


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


class RWKU(MetricSet):
    """ROUGE-L recall of greedy answers on RWKU forget levels 1-3 and neighbour levels 1-2, under
    the official RWKU protocol or the SAGO port's (see the module docstring for what differs).

    Keys: ``forget_rougeL_level{1,2,3}``, ``forget_rougeL`` (mean of the forget level means),
    ``forget_rougeL_all`` (mean over every forget probe: RWKU's "All"), and likewise
    ``retain_neighbor_rougeL_level{1,2}``, ``retain_neighbor_rougeL``, ``retain_neighbor_rougeL_all``.

    Args:
        directory: folder with RWKU files (``forget_level1.json`` ... ``neighbor_level2.json``);
            missing levels are skipped.
        protocol: ``official`` (RWKU's evaluation, its leaderboard) or ``sago`` (the SAGO
            paper's port, whose numbers the paper reports).
        chat_template: wrap the question in the tokenizer's chat template (both protocols do for
            instruct models); ``None`` = whenever the tokenizer has one.
        max_new_tokens: generation budget (``None`` = the protocol's: 30 official, 32 SAGO).
        batch_size: generation batch size (both protocols: 16).
        outputs_path: if set, per-item prompts, outputs and scores are written there as JSONL
            after each evaluation.

    Data-parallel: under DDP or FSDP each process generates its share of the one-process
    batches (the same padding, so the same greedy answers), and the ROUGE sums are added.
    """

    data_parallel = True

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
        self._tokenizer_stops: list[int] = []

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
        self._tokenizer_stops = stop_token_ids(tokenizer, self.protocol)

    def compute(self, model: nn.Module, tokenizer: Any, partition: Partition = SINGLE) -> dict[str, float]:
        results: dict[str, float] = {}
        per_item = []
        score = SCORERS[self.protocol]
        stops = SAGO_STOPS if self.protocol == "sago" else []
        config = getattr(model, "generation_config", None)
        stop_ids = list(
            dict.fromkeys([*_as_ids(getattr(config, "eos_token_id", None)), *self._tokenizer_stops])
        )
        for group, prefix in (("forget", "forget_rougeL"), ("neighbor", "retain_neighbor_rougeL")):
            level_means, pooled_sum, pooled_count = [], 0.0, 0
            for level, items in self._items.items():
                if not level.startswith(group):
                    continue
                prompts = self._prompts[level]
                answers = shared_greedy(
                    model, tokenizer, prompts, partition, self.batch_size, max_new_tokens=self.max_new_tokens,
                    stop_strings=stops, add_special_tokens=self._special, stop_ids=stop_ids,
                )  # fmt: skip
                # (item, output, score) of this process's share
                mine = [(i, a, score(a, str(items[i]["answer"]))) for i, a in answers]
                total, count = partition.total([sum(s for _, _, s in mine), len(mine)])
                results[f"{prefix}_{level.split('_')[1]}"] = total / count
                level_means.append(total / count)
                pooled_sum, pooled_count = pooled_sum + total, pooled_count + int(count)
                if self.outputs_path:
                    per_item += [
                        {"level": level, "type": items[i].get("type"), "prompt": prompts[i],
                         "answer": items[i]["answer"], "output": a, "rougeL_recall": s}
                        for i, a, s in partition.concatenate(mine)
                    ]  # fmt: skip
            if level_means:
                results[prefix] = sum(level_means) / len(level_means)
                results[f"{prefix}_all"] = pooled_sum / pooled_count
        if self.outputs_path and partition.rank == 0:
            with open(self.outputs_path, "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in per_item)
        return results
