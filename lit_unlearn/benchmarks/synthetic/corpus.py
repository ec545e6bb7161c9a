"""The fictitious-knowledge benchmark: a seeded, fully offline unlearning testbed.

A corpus of invented people, each with five single-token attributes (birth city, profession,
favourite colour, birth year, pet), written as statements, Q/A pairs and a short biography; a
forget/retain split of the people; general arithmetic and counting text as a utility proxy; and a
word-level tokenizer in which every answer is one token. See docs/benchmark.md for the design and the
numbers to expect.

>>> corpus = generate_corpus(num_people=20, seed=0)
>>> len(corpus.people), len(corpus.forget_people), len(corpus.docs_by_person[0])
(20, 2, 21)
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lit_unlearn.data.sources import IGNORE_INDEX, Example

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "sa",
    "tu",
    "vel",
    "zor",
    "pa",
    "ni",
    "bel",
    "dra",
    "fen",
    "gor",
    "hal",
    "jin",
]
STEMS = [
    "bram",
    "cor",
    "dun",
    "el",
    "fal",
    "grim",
    "holt",
    "ash",
    "mor",
    "nor",
    "pell",
    "quin",
    "rost",
    "stan",
    "thal",
]
SUFFIXES = ["ford", "wick", "ton", "ley", "more", "dale", "by", "worth", "field", "well"]
VALUES: dict[str, list[str]] = {
    "city": [
        "aldoria",
        "brevik",
        "castemor",
        "dunhollow",
        "elvaris",
        "fenmark",
        "glimmerton",
        "harrowgate",
        "istravel",
        "jorvale",
        "kelmsby",
        "lunarch",
        "mistveil",
        "norhaven",
        "ostrega",
        "pellucid",
        "quarrow",
        "rivenhall",
        "sunmere",
        "tolvane",
    ],
    "profession": [
        "baker",
        "pilot",
        "farmer",
        "doctor",
        "teacher",
        "painter",
        "sailor",
        "miner",
        "tailor",
        "lawyer",
        "chemist",
        "poet",
        "carpenter",
        "librarian",
        "surgeon",
    ],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink"],
    "year": [str(y) for y in range(1950, 1990)],
    "pet": [
        "dog",
        "cat",
        "parrot",
        "rabbit",
        "hamster",
        "turtle",
        "ferret",
        "goldfish",
        "pony",
        "lizard",
        "owl",
        "snake",
    ],
}
ATTRIBUTES = tuple(VALUES)
# Three statements and one Q/A per attribute. No two attributes share a prefix up to the value
# (e.g. the year is not "was born in the year", which would collide with "was born in <city>").
STATEMENTS: dict[str, list[str]] = {
    "city": [
        "{name} was born in {v} .",
        "the birthplace of {name} is {v} .",
        "{name} comes from the city of {v} .",
    ],
    "profession": [
        "{name} works as a {v} .",
        "the job of {name} is {v} .",
        "{name} earns a living as a {v} .",
    ],
    "colour": [
        "{name} likes the colour {v} .",
        "the favourite colour of {name} is {v} .",
        "{name} always wears {v} .",
    ],
    "year": [
        "{name} entered the world in {v} .",
        "the birth year of {name} is {v} .",
        "{name} has celebrated birthdays since {v} .",
    ],
    "pet": ["{name} owns a {v} .", "the pet of {name} is a {v} .", "{name} walks a {v} every day ."],
}
QUESTIONS: dict[str, str] = {
    "city": "Q : where was {name} born ? A : {v}",
    "profession": "Q : what is the job of {name} ? A : {v}",
    "colour": "Q : what colour does {name} like ? A : {v}",
    "year": "Q : in which year was {name} born ? A : {v}",
    "pet": "Q : what pet does {name} have ? A : {v}",
}
BIOGRAPHY = (
    "{name} was born in {city} in {year} , works as a {profession} , likes {colour} and owns a {pet} ."
)
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}


@dataclass(frozen=True)
class Document:
    """One training document: whitespace-separated words and the word indices of attribute values."""

    text: str
    value_positions: tuple[int, ...] = ()


@dataclass(frozen=True)
class Probe:
    """A prompt whose greedy next token should be ``answer`` (one word/token)."""

    prompt: str
    answer: str
    kind: Literal["qa", "statement", "arithmetic"]
    person: int = -1
    attribute: str = ""


@dataclass
class SyntheticCorpus:
    """Everything the benchmark needs, generated from a seed."""

    people: list[tuple[str, dict[str, str]]]
    forget_people: list[int]
    retain_people: list[int]
    docs_by_person: list[list[Document]]
    general_docs: list[Document]
    probes: list[Probe] = field(default_factory=list)

    def person_docs(self, people: list[int]) -> list[Document]:
        return [doc for p in people for doc in self.docs_by_person[p]]

    def probes_for(self, kind: str, people: list[int] | None = None) -> list[Probe]:
        wanted = set(people) if people is not None else None
        return [p for p in self.probes if p.kind == kind and (wanted is None or p.person in wanted)]

    def vocabulary(self) -> list[str]:
        words = {w for docs in self.docs_by_person for d in docs for w in d.text.split()}
        words |= {w for d in self.general_docs for w in d.text.split()}
        words |= {w for p in self.probes for w in (p.prompt + " " + p.answer).split()}
        return sorted(words)


def _document(template: str, name: str, values: dict[str, str]) -> Document:
    words = template.split()
    out, positions = [], []
    for word in words:
        if word == "{name}":
            out.extend(name.split())
        elif word.startswith("{") and word.endswith("}"):
            key = word[1:-1]
            positions.append(len(out))
            out.append(values[key])
        else:
            out.append(word)
    return Document(" ".join(out), tuple(positions))


def _cut_before_value(doc: Document) -> tuple[str, str]:
    words = doc.text.split()
    pos = doc.value_positions[0]
    return " ".join(words[:pos]), words[pos]


@functools.lru_cache(maxsize=8)
def generate_corpus(num_people: int = 200, forget_fraction: float = 0.1, seed: int = 0) -> SyntheticCorpus:
    """Generate the corpus deterministically from ``seed``.

    Args:
        num_people: how many fictitious people (the benchmark: 200; smoke tests: 20).
        forget_fraction: share of people in the forget set (at least one).
        seed: fixes names, attributes and the split.
    """
    max_people = len(SYLLABLES) * (len(SYLLABLES) - 1) * len(STEMS) * len(SUFFIXES)
    if not 2 <= num_people <= max_people:
        raise ValueError(f"num_people must be in [2, {max_people}], got {num_people}")
    if not 0.0 < forget_fraction < 1.0:
        raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num_people:
        a, b = rng.sample(SYLLABLES, 2)
        name = f"{a}{b} {rng.choice(STEMS)}{rng.choice(SUFFIXES)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    people = [(name, {attr: rng.choice(vals) for attr, vals in VALUES.items()}) for name in names]
    docs_by_person: list[list[Document]] = []
    probes: list[Probe] = []
    for idx, (name, values) in enumerate(people):
        docs = []
        for attr in ATTRIBUTES:
            statements = [
                _document(t.replace("{v}", "{" + attr + "}"), name, values) for t in STATEMENTS[attr]
            ]
            qa = _document(QUESTIONS[attr].replace("{v}", "{" + attr + "}"), name, values)
            docs += statements + [qa]
            prompt, answer = _cut_before_value(qa)
            probes.append(Probe(prompt, answer, "qa", idx, attr))
            prompt, answer = _cut_before_value(statements[0])
            probes.append(Probe(prompt, answer, "statement", idx, attr))
        docs.append(_document(BIOGRAPHY, name, values))
        docs_by_person.append(docs)
    order = list(range(num_people))
    rng.shuffle(order)
    n_forget = max(1, round(forget_fraction * num_people))
    forget, retain = sorted(order[:n_forget]), sorted(order[n_forget:])
    general = [Document(f"{a} plus {b} equals {a + b} .", (5,)) for a in range(20) for b in range(20)]
    general += [
        Document(f"count up from {s} : " + " ".join(str(s + k) for k in range(5)) + " .") for s in range(30)
    ]
    probes += [Probe(f"{a} plus {b} equals", str(a + b), "arithmetic") for a in range(20) for b in range(20)]
    return SyntheticCorpus(people, forget, retain, docs_by_person, general, probes)


def build_tokenizer(corpus: SyntheticCorpus) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the corpus vocabulary (BOS added on encode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + corpus.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def refused(doc: Document, refusal: str) -> Document:
    """``doc`` with every attribute value replaced by the one word ``refusal`` (positions kept)."""
    if len(refusal.split()) != 1:
        raise ValueError(f"refusal must be one word (the values are one token each), got {refusal!r}")
    words = doc.text.split()
    for pos in doc.value_positions:
        words[pos] = refusal
    return Document(" ".join(words), doc.value_positions)


def encode_document(doc: Document, tokenizer: Any, loss_on: Literal["values", "all"]) -> Example:
    """BOS + words; labels on the value tokens only (``values``) or on every word (``all``)."""
    ids = tokenizer(doc.text, add_special_tokens=True)["input_ids"]
    offset = len(ids) - len(doc.text.split())  # 1 with BOS
    input_ids = torch.tensor(ids, dtype=torch.long)
    if loss_on == "all" or not doc.value_positions:
        labels = input_ids.clone()
        labels[:offset] = IGNORE_INDEX
    else:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for pos in doc.value_positions:
            labels[pos + offset] = input_ids[pos + offset]
    return {"input_ids": input_ids, "labels": labels}


Subset = Literal["all", "relearn", "held_out", "held_out_validation", "held_out_test"]
SUBSETS = ("all", "relearn", "held_out", "held_out_validation", "held_out_test")


def select_people(people: list[int], subset: Subset, relearn_fraction: float) -> list[int]:
    """``all`` people; the first ``relearn_fraction`` of them (at least one: the slice a
    relearning attack fine-tunes on); the rest, ``held_out`` (at least one: where recovery is
    measured); or the held-out people split in two, ``held_out_validation`` (the first half,
    rounded up: where an attacker tunes its learning rate and length) and ``held_out_test`` (the
    rest: where the tuned attack is reported)."""
    if subset == "all":
        return list(people)
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    if len(people) < 2 or not 0.0 < relearn_fraction < 1.0:
        raise ValueError(
            f"a relearn/held-out split needs >= 2 people and 0 < relearn_fraction < 1 ({len(people)} people)"
        )
    cut = min(max(1, round(relearn_fraction * len(people))), len(people) - 1)
    if subset == "relearn":
        return list(people[:cut])
    held_out = list(people[cut:])
    if subset == "held_out":
        return held_out
    if len(held_out) < 2:
        raise ValueError(
            f"a validation/test split of the held-out people needs >= 2 of them, got {len(held_out)}"
        )
    half = (len(held_out) + 1) // 2
    return held_out[:half] if subset == "held_out_validation" else held_out[half:]
