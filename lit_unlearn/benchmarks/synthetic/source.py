"""The benchmark's corpus as a data source: forget, retain or general documents."""

from __future__ import annotations

from typing import Any, Literal

from lit_unlearn.benchmarks.synthetic.corpus import (
    Document,
    Subset,
    SyntheticCorpus,
    encode_document,
    generate_corpus,
    refused,
    select_people,
)
from lit_unlearn.data.sources import ALTERNATE, DataSource, Example


class SyntheticKnowledge(DataSource):
    """Documents of the fictitious-knowledge benchmark as a forget/retain/general source.

    Forget documents carry an alternate answer (for IdkDPO): the same document with every
    attribute value replaced by ``refusal``. The benchmark's word-level vocabulary has no refusal
    words, so the default ``unknown`` becomes the tokenizer's unknown token — the one token the
    target never predicts, this world's "I don't know".

    Args:
        part: ``forget`` / ``retain`` people's documents, or ``general`` (arithmetic and counting).
        loss_on: ``values`` = loss on attribute-value tokens only (answer-only, the default for
            unlearning); ``all`` = loss on every token. General text always uses every token.
        include_general: also add the general text to this part (e.g. to a retain stream).
        num_people: corpus size (must match the target model's corpus).
        forget_fraction: share of people in the forget set.
        seed: corpus seed (must match the target model's corpus).
        subset: ``all`` of the part's people, or for a relearning attack the ``relearn`` slice
            (the first ``relearn_fraction`` of them) or the ``held_out`` rest.
        relearn_fraction: size of the ``relearn`` slice.
        refusal: the word that replaces each value in a forget document's alternate.
    """

    def __init__(
        self,
        part: Literal["forget", "retain", "general"] = "forget",
        loss_on: Literal["values", "all"] = "values",
        include_general: bool = False,
        num_people: int = 200,
        forget_fraction: float = 0.1,
        seed: int = 0,
        subset: Subset = "all",
        relearn_fraction: float = 0.5,
        refusal: str = "unknown",
    ) -> None:
        if part not in ("forget", "retain", "general"):
            raise ValueError(f"part must be 'forget', 'retain' or 'general', got {part!r}")
        if loss_on not in ("values", "all"):
            raise ValueError(f"loss_on must be 'values' or 'all', got {loss_on!r}")
        self.part, self.loss_on, self.include_general = part, loss_on, include_general
        self.num_people, self.forget_fraction, self.seed = num_people, forget_fraction, seed
        self.subset, self.relearn_fraction = subset, relearn_fraction
        self.refusal = refusal

    def describe(self) -> str:
        subset = "" if self.subset == "all" else f", subset={self.subset}"
        return f"SyntheticKnowledge(part={self.part}, people={self.num_people}, seed={self.seed}{subset})"

    def corpus(self) -> SyntheticCorpus:
        return generate_corpus(self.num_people, self.forget_fraction, self.seed)

    def build(self, tokenizer: Any, max_length: int) -> list[Example]:
        corpus = self.corpus()
        docs: list[tuple[Document, Literal["values", "all"]]] = []
        if self.part != "general":
            people = corpus.forget_people if self.part == "forget" else corpus.retain_people
            people = select_people(people, self.subset, self.relearn_fraction)
            docs += [(d, self.loss_on) for d in corpus.person_docs(people)]
        if self.part == "general" or self.include_general:
            docs += [(d, "all") for d in corpus.general_docs]
        examples = []
        for doc, loss_on in docs:
            ex = encode_document(doc, tokenizer, loss_on)
            if ex["input_ids"].numel() > max_length:
                raise ValueError(
                    f"{self.describe()}: a document has {ex['input_ids'].numel()} tokens > max_length={max_length}"
                )
            if self.part == "forget":
                alternate = encode_document(refused(doc, self.refusal), tokenizer, loss_on)
                ex.update({ALTERNATE + key: value for key, value in alternate.items()})
            examples.append(ex)
        return examples
