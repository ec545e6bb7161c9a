"""Membership inference: does the model still treat the forget texts as training data?

Four per-text attacks, each a *loss-like* score (higher = the model finds the text less familiar):

* ``loss``: mean negative log-likelihood of the text's tokens (after BOS);
* ``zlib``: ``loss`` divided by the length in bytes of the zlib-compressed text (texts that are
  simply predictable are discounted);
* ``mink``: mean negative log-probability of the k % least likely tokens (Min-K%);
* ``minkpp``: the same on standardised log-probabilities, ``(log p(x_t) - mu_t) / sigma_t`` with
  ``mu_t`` and ``sigma_t`` the mean and standard deviation of ``log p`` under the model's own
  next-token distribution (Min-K%++).

For each set (forget, its holdout, and optionally retain) the means are reported, as RWKU does, and
the forget-vs-holdout AUC of every attack: the probability that a random forget text looks more
familiar (lower score) than a random holdout text, ties counting one half. Before unlearning the
forget texts were trained on and the AUC is high; 0.5 means the attack can no longer tell them from
texts the model never saw; well below 0.5 means they now stand out as *less* familiar than unseen
text (over-forgetting, itself a membership signal).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus
from lit_unlearn.data.sources import DataSourceError, read_records
from lit_unlearn.eval.metrics import MetricSet
from lit_unlearn.partition import SINGLE, Partition

ATTACKS = ("loss", "zlib", "mink", "minkpp")
log = logging.getLogger(__name__)


def token_statistics(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per position: ``log p(target)`` and its standardised value under the predicted distribution.

    Args:
        logits: ``[T, V]`` next-token logits (position t predicts ``targets[t]``).
        targets: ``[T]`` token ids.
    """
    logp = logits.double().log_softmax(-1)
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp * logp).sum(-1) - mu * mu
    return picked, (picked - mu) / var.clamp_min(1e-24).sqrt()


def lowest_mean(values: Tensor, k: float) -> float:
    """Mean of the ``max(1, floor(k · n))`` smallest values."""
    count = max(1, int(k * values.numel()))
    return values.sort().values[:count].mean().item()


def attack_scores(picked: Tensor, standardised: Tensor, text: str, k: float) -> dict[str, float]:
    """The four loss-like scores of one text from its token statistics."""
    loss = -picked.mean().item()
    return {
        "loss": loss,
        "zlib": loss / len(zlib.compress(text.encode("utf-8"))),
        "mink": -lowest_mean(picked, k),
        "minkpp": -lowest_mean(standardised, k),
    }


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(member score < non-member score) + ½ P(equal), for loss-like scores (Mann-Whitney)."""
    if not members or not nonmembers:
        return float("nan")
    wins = sum((m < n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int | None = None, where: str = "text"
) -> list[list[int]]:
    """Token ids of each text with BOS in front (added when the tokenizer does not add it), whole
    (or cut to ``max_length``); a text with no token after BOS is a one-line error naming it."""
    bos = tokenizer.bos_token_id
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if len(ids) < 2:
            raise DataSourceError(f"membership inference: {where} {i} ({text[:40]!r}) has no token to score")
        out.append(ids[:max_length] if max_length else ids)
    return out


def model_context(model: nn.Module) -> int | None:
    """The longest input the model takes (``max_position_embeddings``), if it says."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


@torch.no_grad()
def score_ids(
    model: nn.Module, ids: Sequence[list[int]], texts: Sequence[str], k: float
) -> list[dict[str, float]]:
    """Attack scores of tokenized texts, one forward pass each (a 128k-token vocabulary's
    log-softmax over a batch would not fit next to a 7B model). A text longer than the model's
    context is scored on its first ``max_position_embeddings`` tokens (a warning says how many)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context = model_context(model)
    out = []
    try:
        for row, text in zip(ids, texts):
            tensor = torch.tensor([row[:context] if context else row], device=device)
            logits = model(input_ids=tensor).logits[0, :-1]
            picked, standardised = token_statistics(logits, tensor[0, 1:])
            out.append(attack_scores(picked.cpu(), standardised.cpu(), text, k))
    finally:
        model.train(was_training)
    return out


def score_texts(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], k: float = 0.2, max_length: int | None = None
) -> list[dict[str, float]]:
    """Attack scores of each text (see :func:`tokenize_texts` and :func:`score_ids`)."""
    return score_ids(model, tokenize_texts(tokenizer, texts, max_length), texts, k)


class MembershipInference(MetricSet):
    """LOSS, Zlib, Min-K% and Min-K%++ membership inference on forget texts against a holdout of
    texts the model never saw (and, optionally, retain texts), e.g. RWKU's ``mia_forget`` /
    ``mia_retain`` files.

    Keys: ``forget_mia_<attack>``, ``forget_holdout_mia_<attack>`` and ``retain_mia_<attack>``
    (mean loss-like scores; higher = less familiar), and with a holdout ``forget_mia_<attack>_auc``
    (forget vs holdout; 0.5 = indistinguishable from unseen text), for attack in loss, zlib, mink,
    minkpp. Texts are scored whole, as RWKU does (up to the model's context, not the training
    ``max_length``), so Zlib divides the loss of the text it compresses. A text whose scores are
    not finite (a NaN/inf loss) is left out of every mean and AUC and counted in
    ``<set>_mia_nonfinite`` (reported when > 0, with a warning).

    Args:
        forget: JSON/JSONL file(s) of forget texts (members before unlearning).
        holdout: file(s) of texts from the same distribution that were never trained on (for the
            AUC; RWKU itself reports means only: leave it out).
        retain: optional file(s) of retain texts (RWKU's ``mia_retain``; means only).
        text_field: the field that holds the text (RWKU: ``text``).
        k: the fraction of least likely tokens for Min-K% and Min-K%++ (0.2 = 20 %).
        max_texts: score only the first N texts of each set (``None`` = all).
        max_tokens: score at most the first N tokens after BOS of each text (MUSE: 2048);
            ``None`` = the whole text, up to the model's context.
    """

    def __init__(
        self,
        forget: str | list[str],
        holdout: str | list[str] | None = None,
        retain: str | list[str] | None = None,
        text_field: str = "text",
        k: float = 0.2,
        max_texts: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {k}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.files = {"forget": forget, "forget_holdout": holdout, "retain": retain}
        self.text_field, self.k, self.max_texts, self.max_tokens = text_field, k, max_texts, max_tokens
        self._texts: dict[str, list[str]] = {}
        self._ids: dict[str, list[list[int]]] = {}

    def texts(self) -> dict[str, list[str]]:
        """The texts of each set, read and validated."""
        out = {}
        for name, files in self.files.items():
            if files is None:
                continue
            paths = [files] if isinstance(files, str) else list(files)
            out[name] = [r[self.text_field] for p in paths for r in read_records(p, [self.text_field])]
        return out

    def setup(self, tokenizer: Any, max_length: int) -> None:
        """Read and tokenize every set once (bad or empty texts fail here, before training)."""
        texts = self.texts()
        self._texts = {name: t[: self.max_texts] if self.max_texts else t for name, t in texts.items()}
        for name, rows in self._texts.items():
            if not rows:
                raise DataSourceError(f"membership inference: the {name} set has no text")
        self._ids = {
            name: tokenize_texts(tokenizer, t, self.max_tokens and self.max_tokens + 1, f"{name} text")
            for name, t in self._texts.items()
        }

    data_parallel = True

    def _scores(
        self, model: nn.Module, name: str, texts: list[str], partition: Partition
    ) -> list[dict[str, float]]:
        """Every text's scores: each rank scores its share into a zero table whose sum over the
        ranks is then the whole table (an all-gather through the partition's one sum)."""
        if partition.world_size == 1:
            return score_ids(model, self._ids[name], texts, self.k)
        table = torch.zeros(len(texts), len(ATTACKS), dtype=torch.float64)
        for (i,), counted in partition.batches(range(len(texts)), 1):
            (row,) = score_ids(model, [self._ids[name][i]], [texts[i]], self.k)
            if counted:
                table[i] = torch.tensor([row[attack] for attack in ATTACKS], dtype=torch.float64)
        full = torch.tensor(partition.total(table.view(-1)), dtype=torch.float64).view(len(texts), -1)
        return [dict(zip(ATTACKS, values)) for values in full.tolist()]

    def compute(self, model: nn.Module, tokenizer: Any, partition: Partition = SINGLE) -> dict[str, float]:
        context = model_context(model)
        if context:
            cut = sum(len(row) > context for rows in self._ids.values() for row in rows)
            if cut:
                log.warning(
                    "membership inference: %d text(s) longer than the model's context (%d tokens) scored on their start",
                    cut,
                    context,
                )
        scores = {}
        out: dict[str, float] = {}
        for name, texts in self._texts.items():
            rows = self._scores(model, name, texts, partition)
            finite = [r for r in rows if all(math.isfinite(v) for v in r.values())]
            if len(finite) < len(rows):
                out[f"{name}_mia_nonfinite"] = float(len(rows) - len(finite))
                log.warning(
                    "membership inference: %d %s text(s) with non-finite scores left out",
                    len(rows) - len(finite),
                    name,
                )
            scores[name] = finite
        for name, rows in scores.items():
            for attack in ATTACKS:
                out[f"{name}_mia_{attack}"] = (
                    math.fsum(r[attack] for r in rows) / len(rows) if rows else float("nan")
                )
        for attack in ATTACKS if "forget_holdout" in scores else ():
            out[f"forget_mia_{attack}_auc"] = auc(
                [r[attack] for r in scores["forget"]], [r[attack] for r in scores["forget_holdout"]]
            )
        return out


class SyntheticMembership(MembershipInference):
    """Membership inference on the embedded benchmark: forget = the forget people's documents;
    holdout = the same documents with every attribute value taken from another forget person
    (in-vocabulary texts the target never saw); retain = the retain people's documents.

    Args:
        num_people: corpus size (must match the target).
        forget_fraction: share of forget people (must match the target).
        seed: corpus seed (must match the target).
        k: the fraction of least likely tokens for Min-K% and Min-K%++.
        max_texts: score only the first N texts of each set (``None`` = all).
    """

    def __init__(
        self,
        num_people: int = 200,
        forget_fraction: float = 0.1,
        seed: int = 0,
        k: float = 0.2,
        max_texts: int | None = 100,
    ) -> None:
        super().__init__(forget=[], holdout=[], k=k, max_texts=max_texts)
        self.num_people, self.forget_fraction, self.seed = num_people, forget_fraction, seed

    def texts(self) -> dict[str, list[str]]:
        corpus = generate_corpus(self.num_people, self.forget_fraction, self.seed)
        forget = corpus.forget_people
        holdout = []
        for i, person in enumerate(forget):
            other = forget[(i + 1) % len(forget)]
            for doc, donor in zip(corpus.docs_by_person[person], corpus.docs_by_person[other]):
                words, values = doc.text.split(), donor.text.split()
                for position, donor_position in zip(doc.value_positions, donor.value_positions):
                    words[position] = values[donor_position]
                if words != doc.text.split():  # all values shared by chance: not a new text
                    holdout.append(" ".join(words))
        return {
            "forget": [d.text for d in corpus.person_docs(forget)],
            "forget_holdout": holdout,
            "retain": [d.text for d in corpus.person_docs(corpus.retain_people)],
        }
