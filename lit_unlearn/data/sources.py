"""Data sources: where forget and retain text come from, and how it becomes training examples.

Each source is a small class chosen in YAML by ``class_path`` and turned into examples by
``build(tokenizer, max_length)``. An example is a dict of two 1-D ``LongTensor`` s of equal length:
``input_ids`` and ``labels`` (``-100`` where no loss is taken). Padding happens at collation.

Formats:
- :class:`TextCorpus`: JSONL with a text field (WMDP ``bio-forget-corpus.jsonl``, RWKU passages),
  JSON arrays, or ``.txt``; documents are concatenated with a separator and cut into
  ``max_length``-token chunks with loss on every token (the paper uses 512-token chunks).
- :class:`QAPairs`: prompt/answer records; loss only on answer tokens; optional chat template;
  optionally an *alternate* answer per record (a refusal such as "I don't know") for objectives
  that contrast the forget answer with a preferred one (IdkDPO).
- :class:`HFDataset`: a Hugging Face dataset by name/config/split (needs hub access, or a local
  builder such as ``json`` with ``data_files``), as text or as QA pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from lit_unlearn.errors import UserError

log = logging.getLogger(__name__)

Example = dict[str, Tensor]
IGNORE_INDEX = -100
ALTERNATE = "alternate_"
"""Prefix of an example's alternate-answer fields (``alternate_input_ids``, ``alternate_labels``);
collation turns them into the batch's ``alternate`` sub-batch."""


class DataSourceError(UserError):
    """Bad input data: the message names the file, the line and what was expected."""


def _as_paths(path: str | Sequence[str]) -> list[str]:
    return [path] if isinstance(path, str) else list(path)


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataSourceError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None


def read_json(path: str, where: str) -> Any:
    """A whole JSON file; a missing file or invalid JSON is one line starting with ``where``."""
    if not os.path.exists(path):
        raise DataSourceError(f"{where}: no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataSourceError(f"{where}: not valid JSON ({error})") from None


def _checked_path(path: str) -> str:
    """The lower-case extension of an existing, supported data file."""
    if not os.path.exists(path):
        raise DataSourceError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataSourceError(f"{path}: expected a file, got a directory")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl", ".json"):
        raise DataSourceError(f"{path}: unsupported extension {ext!r}; expected .jsonl, .json or .txt")
    return ext


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    """``(file:line, parsed value)`` of a JSON Lines file, read one line at a time."""
    offset, seen = 0, False
    with open(path, "rb") as handle:
        # JSON Lines ends records at "\n" only (binary iteration splits there and nowhere else):
        # str.splitlines would also split at U+2028, U+2029 or U+0085, which
        # json.dumps(ensure_ascii=False) writes raw inside strings.
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataSourceError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {raw[err.start]:#04x} at offset {offset + err.start}); "
                    "save the file as UTF-8"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            seen = True
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(
                    f"{path}:{lineno}: malformed JSON line ({err.msg}, column {err.colno})"
                ) from None
    if not seen:
        raise DataSourceError(f"{path}: file is empty")


def iter_located_records(path: str, fields: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Like :func:`read_located_records`, lazily: ``.jsonl`` files are read one line at a time, so
    a corpus of any size streams through in bounded memory (``.json`` and ``.txt`` are read whole)."""
    ext = _checked_path(path)
    records: Iterable[tuple[str, Any]]
    if ext == ".jsonl":
        records = _jsonl_records(path)
    else:
        text = _read_text(path)
        if not text.strip():
            raise DataSourceError(f"{path}: file is empty")
        if ext == ".txt":
            yield path, {fields[0]: text}
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise DataSourceError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        if not data:
            raise DataSourceError(f"{path}: no records")
        records = ((f"{path}[{i}]", item) for i, item in enumerate(data))
    for where, record in records:
        if isinstance(record, str) and len(fields) == 1:
            record = {fields[0]: record}
        if not isinstance(record, dict):
            raise DataSourceError(
                f"{where}: expected an object with field(s) {list(fields)}, got {type(record).__name__}"
            )
        for field in fields:
            if field not in record:
                raise DataSourceError(f"{where}: missing field {field!r} (found {sorted(record)})")
            if not isinstance(record[field], str):
                raise DataSourceError(
                    f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}"
                )
        yield where, record


def read_located_records(path: str, fields: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Like :func:`read_records`, each record with its location (``file:line`` or ``file[i]``)."""
    return list(iter_located_records(path, fields))


def read_records(path: str, fields: Sequence[str]) -> list[dict[str, Any]]:
    """Read ``.jsonl`` / ``.json`` / ``.txt`` into records that carry every name in ``fields``.

    ``.txt`` yields one record ``{fields[0]: <whole file>}``. A JSON array may hold strings
    (taken as ``fields[0]``) or objects. Every problem is a :class:`DataSourceError` naming the
    file and line: missing, empty, not UTF-8, malformed JSON, missing or non-string fields.
    """
    return [record for _, record in read_located_records(path, fields)]


def read_alternates(path: str) -> list[str]:
    """Refusals (alternate answers) from ``path``: one per non-empty line of a ``.txt``, or the
    strings (or ``text`` fields) of a ``.json`` array / ``.jsonl`` file. Empty entries are errors."""
    if path.lower().endswith(".txt"):
        (record,) = read_records(path, ["text"])
        lines = [line.strip() for line in record["text"].split("\n")]
        return [line for line in lines if line]
    located = read_located_records(path, ["text"])
    for where, record in located:
        if not record["text"].strip():
            raise DataSourceError(f"{where}: empty alternate answer")
    return [record["text"] for _, record in located]


def pick(seed: int, index: int, choices: int) -> int:
    """A deterministic choice in ``range(choices)`` from ``(seed, index)``: the same in every
    process, on every platform and after a resume (no global random state involved)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % choices


def chunk_token_stream(ids: Sequence[int], max_length: int, bos_id: int | None = None) -> list[list[int]]:
    """Cut a token stream into chunks of exactly ``max_length`` tokens (the last may be shorter).

    With ``bos_id`` every chunk starts with BOS and holds ``max_length - 1`` stream tokens.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    body = max_length - 1 if bos_id is not None else max_length
    chunks = []
    for start in range(0, len(ids), body):
        piece = list(ids[start : start + body])
        chunks.append(([bos_id] if bos_id is not None else []) + piece)
    return chunks


def stream_chunks(
    texts: Iterable[str],
    tokenizer: Any,
    max_length: int,
    separator: str = "\n\n",
    add_bos: bool = True,
    batch_documents: int = 256,
) -> Iterator[Example]:
    """Concatenate documents with ``separator``, tokenize, chunk; loss on every token — lazily:
    ``batch_documents`` documents are tokenized at a time and only the unfinished chunk is kept,
    so memory does not grow with the corpus. Gives exactly :func:`chunk_token_stream`'s chunks of
    the whole stream."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    sep_ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    if separator and not sep_ids and tokenizer.eos_token_id is not None:
        sep_ids = [tokenizer.eos_token_id]
    bos = tokenizer.bos_token_id if add_bos else None
    body = max_length - 1 if bos is not None else max_length
    head = [bos] if bos is not None else []
    texts = iter(texts)
    buffer: list[int] = []
    started = False

    def example(ids: list[int]) -> Example:
        chunk = torch.tensor(head + ids, dtype=torch.long)
        return {"input_ids": chunk, "labels": chunk.clone()}

    while batch := list(islice(texts, batch_documents)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if started:
                buffer.extend(sep_ids)
            started = True
            buffer.extend(ids)
        full = len(buffer) // body * body
        for start in range(0, full, body):
            yield example(buffer[start : start + body])
        del buffer[:full]
    if buffer:
        yield example(buffer)


def texts_to_chunks(
    texts: Iterable[str], tokenizer: Any, max_length: int, separator: str = "\n\n", add_bos: bool = True
) -> list[Example]:
    """:func:`stream_chunks` as a list."""
    return list(stream_chunks(texts, tokenizer, max_length, separator, add_bos))


def encode_qa(
    prompt: str,
    answer: str,
    tokenizer: Any,
    max_length: int,
    chat_template: bool = False,
    add_eos: bool = True,
) -> tuple[Example, bool]:
    """Encode one prompt/answer pair with loss on the answer only; returns (example, truncated).

    Too-long pairs lose prompt tokens from the left first (the answer is what is trained), then
    answer tokens from the right; nothing is dropped silently (the caller counts truncations).
    """
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataSourceError("chat_template=True but the tokenizer has no chat template")
        # Render to text, then tokenize without adding specials: the template already has them.
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    truncated = False
    overflow = len(prompt_ids) + len(answer_ids) - max_length
    if overflow > 0:
        truncated = True
        keep_prompt = max(1, len(prompt_ids) - overflow)
        prompt_ids = prompt_ids[-keep_prompt:]
        answer_ids = answer_ids[: max_length - len(prompt_ids)]
    ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }, truncated


def qa_examples(
    records: Iterable[tuple[str, str] | tuple[str, str, str]],
    tokenizer: Any,
    max_length: int,
    chat_template: bool,
    origin: str,
) -> list[Example]:
    """Encode ``(prompt, answer)`` or ``(prompt, answer, alternate)`` records; an alternate is
    stored as ``alternate_input_ids`` / ``alternate_labels`` (same prompt, the other answer)."""
    examples, truncated = [], 0
    for prompt, answer, *alternate in records:
        example, cut = encode_qa(prompt, answer, tokenizer, max_length, chat_template)
        truncated += cut
        if alternate:
            other, cut = encode_qa(prompt, alternate[0], tokenizer, max_length, chat_template)
            truncated += cut
            example.update({ALTERNATE + key: value for key, value in other.items()})
        if (example["labels"] != IGNORE_INDEX).any():
            examples.append(example)
    if truncated:
        log.warning(
            "%s: %d sequence(s) longer than max_length=%d were truncated", origin, truncated, max_length
        )
    return examples


class DataSource(ABC):
    """A forget or retain source: turns raw data into training examples."""

    @abstractmethod
    def build(self, tokenizer: Any, max_length: int) -> list[Example]:
        """Return the tokenized examples (each at most ``max_length`` tokens)."""

    def describe(self) -> str:
        return type(self).__name__

    def validate(self) -> None:
        """Read and check the raw data without a tokenizer (called before anything heavy loads,
        so a bad file fails in seconds). Sources that read files override it."""

    def examples(self, tokenizer: Any, max_length: int) -> Iterator[Example]:
        """The examples one at a time (the example cache is written from this stream). Sources
        whose data can be large override it to stream; the default yields :meth:`build`'s list."""
        yield from self.build(tokenizer, max_length)

    def checked_examples(self, tokenizer: Any, max_length: int) -> Iterator[Example]:
        """:meth:`examples` plus the guarantee that the source is not empty."""
        empty = True
        for example in self.examples(tokenizer, max_length):
            empty = False
            yield example
        if empty:
            raise DataSourceError(f"{self.describe()}: the source yields zero examples/chunks")

    def checked_build(self, tokenizer: Any, max_length: int) -> list[Example]:
        """``build`` plus the guarantee that the source is not empty."""
        return list(self.checked_examples(tokenizer, max_length))


class TextCorpus(DataSource):
    """Plain text corpus: concatenated, chunked, loss on every token.

    Args:
        path: one file or a list of files (``.jsonl``, ``.json`` or ``.txt``).
        text_field: the JSON field that holds the document text (WMDP and RWKU use ``text``).
        separator: inserted between documents before chunking (EOS when it tokenizes to nothing).
        add_bos: start every chunk with the tokenizer's BOS token (when it has one).
        max_documents: keep only the first N documents (``None`` = all).
    """

    def __init__(
        self,
        path: str | list[str],
        text_field: str = "text",
        separator: str = "\n\n",
        add_bos: bool = True,
        max_documents: int | None = None,
    ) -> None:
        self.paths = _as_paths(path)
        self.text_field = text_field
        self.separator = separator
        self.add_bos = add_bos
        self.max_documents = max_documents

    def describe(self) -> str:
        return f"TextCorpus({', '.join(self.paths)})"

    def documents(self) -> Iterator[str]:
        """The documents of every file in order, read lazily (at most ``max_documents``)."""
        records = (
            r[self.text_field] for p in self.paths for _, r in iter_located_records(p, [self.text_field])
        )
        return islice(records, self.max_documents) if self.max_documents else records

    def texts(self) -> list[str]:
        return list(self.documents())

    def validate(self) -> None:
        for _ in self.documents():  # every record checked, none kept
            pass

    def examples(self, tokenizer: Any, max_length: int) -> Iterator[Example]:
        return stream_chunks(self.documents(), tokenizer, max_length, self.separator, self.add_bos)

    def build(self, tokenizer: Any, max_length: int) -> list[Example]:
        return list(self.examples(tokenizer, max_length))


class QAPairs(DataSource):
    """Question/answer (instruction/response) pairs with loss on the answer tokens only.

    Objectives that prefer another answer to the forget answer (:class:`~lit_unlearn.objectives.DPO`)
    need an *alternate* per pair: a record's own ``alternate_field`` (a string, or a list from which
    one is picked), else one refusal from ``alternates_file``. The pick depends only on ``seed`` and
    the record's position in the source, so every rank, every relaunch and every resume sees the
    same alternate.

    Args:
        path: one file or a list of files (``.jsonl`` or ``.json``).
        prompt_field: the field holding the prompt.
        answer_field: the field holding the answer.
        chat_template: wrap the prompt with the tokenizer's chat template (instruction models).
        alternate_field: the optional field holding a record's alternate answer(s).
        alternates_file: refusals for records without one (``.txt``: one per line; ``.json`` /
            ``.jsonl``: strings or ``text`` fields), e.g. ``configs/data/idk_refusals.txt``.
        seed: seed of the alternate picked for each record.
    """

    def __init__(
        self,
        path: str | list[str],
        prompt_field: str = "question",
        answer_field: str = "answer",
        chat_template: bool = False,
        alternate_field: str = "alternate",
        alternates_file: str | None = None,
        seed: int = 0,
    ) -> None:
        self.paths = _as_paths(path)
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.chat_template = chat_template
        self.alternate_field = alternate_field
        self.alternates_file = alternates_file
        self.seed = seed
        # read by validate(), consumed by build()
        self._pairs: list[tuple[str, str]] | list[tuple[str, str, str]] | None = None

    def describe(self) -> str:
        return f"QAPairs({', '.join(self.paths)})"

    def _alternate_of(self, where: str, record: dict[str, Any]) -> list[str] | None:
        value = record.get(self.alternate_field)
        if value is None:
            return None
        values = [value] if isinstance(value, str) else value
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and v.strip() for v in values)
        ):
            raise DataSourceError(
                f"{where}: field {self.alternate_field!r} must be a non-empty string or a list of them"
            )
        return values

    def pairs(self) -> list[tuple[str, str]] | list[tuple[str, str, str]]:
        """The (prompt, answer) pairs of every file, checked; (prompt, answer, alternate) when the
        source has alternates."""
        fields = [self.prompt_field, self.answer_field]
        refusals = read_alternates(self.alternates_file) if self.alternates_file else None
        rows: list[tuple[str, str, list[str] | None, str]] = []
        for path in self.paths:
            for where, record in read_located_records(path, fields):
                if not record[self.answer_field].strip():
                    # an empty answer would train on the EOS token alone: almost certainly a data bug
                    raise DataSourceError(
                        f"{where}: empty {self.answer_field!r}; every pair needs a non-empty answer"
                    )
                rows.append((record[fields[0]], record[fields[1]], self._alternate_of(where, record), where))
        own = [row for row in rows if row[2] is not None]
        if not own and refusals is None:
            return [(prompt, answer) for prompt, answer, _, _ in rows]
        missing = [where for _, _, alternates, where in rows if alternates is None]
        if missing and refusals is None:
            where = missing[0]
            raise DataSourceError(
                f"{where}: no {self.alternate_field!r} field while other records have one; give every "
                "record an alternate or set alternates_file for the rest"
            )
        out = []
        for index, (prompt, answer, alternates, _) in enumerate(rows):
            choices = alternates or refusals or []
            out.append((prompt, answer, choices[pick(self.seed, index, len(choices))]))
        return out

    def validate(self) -> None:
        self._pairs = self.pairs()

    def build(self, tokenizer: Any, max_length: int) -> list[Example]:
        pairs = self._pairs or self.pairs()
        self._pairs = None
        return qa_examples(pairs, tokenizer, max_length, self.chat_template, self.describe())


class HFDataset(DataSource):
    """A Hugging Face dataset, as a text corpus or (with both QA fields) as QA pairs.

    Needs hub access for hub names; local builders work offline, e.g.
    ``HFDataset(name="json", data_files="data/bio-forget.jsonl")``.

    Args:
        name: dataset name on the hub (``cais/wmdp-corpora``) or a builder (``json``).
        config: dataset configuration (``bio-forget-corpus``), if any.
        split: which split to read.
        text_field: field holding the text (text-corpus mode).
        prompt_field: with ``answer_field``, switches to QA mode.
        answer_field: the answer field (QA mode).
        data_files: files for local builders.
        separator: document separator in text mode.
        chat_template: apply the tokenizer's chat template in QA mode.
        revision: dataset revision to pin.
        max_documents: keep only the first N rows.
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        prompt_field: str | None = None,
        answer_field: str | None = None,
        data_files: str | list[str] | None = None,
        separator: str = "\n\n",
        chat_template: bool = False,
        revision: str | None = None,
        max_documents: int | None = None,
    ) -> None:
        self.name, self.config, self.split = name, config, split
        self.text_field, self.prompt_field, self.answer_field = text_field, prompt_field, answer_field
        self.data_files, self.separator, self.chat_template = data_files, separator, chat_template
        self.revision, self.max_documents = revision, max_documents

    def describe(self) -> str:
        return f"HFDataset({self.name}{'/' + self.config if self.config else ''}:{self.split})"

    def examples(self, tokenizer: Any, max_length: int) -> Iterator[Example]:
        import datasets

        try:
            ds = datasets.load_dataset(
                self.name, self.config, split=self.split, data_files=self.data_files, revision=self.revision
            )
        except Exception as err:  # network, missing config, ... : one clear line
            raise DataSourceError(
                f"{self.describe()}: could not load ({type(err).__name__}: {err})"
            ) from None
        if self.max_documents:
            ds = ds.select(range(min(self.max_documents, len(ds))))
        qa = self.prompt_field is not None and self.answer_field is not None
        needed = [self.prompt_field, self.answer_field] if qa else [self.text_field]
        missing = [f for f in needed if f not in ds.column_names]
        if missing:
            raise DataSourceError(f"{self.describe()}: missing column(s) {missing} (found {ds.column_names})")
        if qa:
            empty = next((i for i, a in enumerate(ds[self.answer_field]) if not str(a).strip()), None)
            if empty is not None:
                raise DataSourceError(
                    f"{self.describe()} row {empty}: empty {self.answer_field!r}; every pair needs a non-empty answer"
                )
            yield from qa_examples(
                zip(ds[self.prompt_field], ds[self.answer_field]),
                tokenizer,
                max_length,
                self.chat_template,
                self.describe(),
            )
            return
        # text mode streams: the rows are read from the memory-mapped dataset 1,000 at a time
        rows = (text for batch in ds.iter(batch_size=1000) for text in batch[self.text_field])
        yield from stream_chunks(rows, tokenizer, max_length, self.separator)

    def build(self, tokenizer: Any, max_length: int) -> list[Example]:
        return list(self.examples(tokenizer, max_length))
