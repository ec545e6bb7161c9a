"""Tokenize once, memory-map everywhere: the on-disk example cache.

Building examples (reading, tokenizing and chunking a corpus) happens once, in
``UnlearningDataModule.prepare_data`` — Lightning runs it on one process per node before the
others start — and the result is written as an Arrow file under the cache directory (by
default the machine's cache, :func:`lit_unlearn.user_cache.cache_root`). The build *streams*:
sources yield examples and the writer flushes them in batches of :data:`WRITE_BATCH`, so the
building process holds a bounded amount whatever the corpus size. Every rank, and every later
launch, then *memory-maps* the file: no rank tokenizes, and no rank holds the corpus in its own
memory (the pages are shared through the OS page cache).

The cache key covers everything the examples depend on: the sources' classes and settings, the
size and modification time of every file they name (a hub dataset is identified by its name and
``revision``: pin the revision to be sure a cached copy matches), the tokenizer (its name, size and, for fast
tokenizers, its full definition), ``max_length`` and the cache format. A changed file or setting
builds a new entry. Entries are built under a lock by one process (ranks, nodes and concurrent
runs reuse it), written to a temporary name, sealed with checksums and renamed, so a crash never
leaves a half-written one and a damaged one is rebuilt (:func:`lit_unlearn.user_cache.build_once`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor

from lit_unlearn.logs import describe
from lit_unlearn.user_cache import build_once

FORMAT = 3  # 3: one streamed Arrow file per sealed entry, alternate answers; bump when the layout changes
WRITE_BATCH = 1000  # examples per Arrow record batch while building
ARROW_FILE = "examples.arrow"
Example = dict[str, Tensor]


def data_files(value: Any) -> Iterator[str]:
    """Paths of existing files named anywhere in a source's arguments."""
    if isinstance(value, str) and os.path.isfile(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from data_files(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from data_files(v)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Name, vocabulary size and (fast tokenizers) the hash of the full tokenizer definition."""
    parts = [str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(hashlib.sha256(backend.to_str().encode()).hexdigest())
    parts.append(str(getattr(tokenizer, "bos_token_id", None)))
    return "|".join(parts)


def source_identity(source: Any) -> dict[str, Any]:
    """A source's class and public settings as plain data (what its examples depend on)."""
    settings = {k: describe(v) for k, v in sorted(vars(source).items()) if not k.startswith("_")}
    return {"class": f"{type(source).__module__}.{type(source).__qualname__}", "settings": settings}


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def settings_hash(described: Sequence[dict[str, Any]]) -> str:
    """A short hash of sources as :func:`source_identity` describes them (classes and settings)."""
    return _hash({"format": FORMAT, "sources": list(described)})


def sources_key(sources: Sequence[Any]) -> str:
    """A short hash of the sources' classes, settings and the size and mtime of their files."""
    described = [source_identity(source) for source in sources]
    stats = [(path, os.path.getsize(path), os.stat(path).st_mtime_ns) for path in data_files(described)]
    return _hash({"format": FORMAT, "sources": described, "files": stats})


def cache_key(sources: Sequence[Any], tokenizer: Any, max_length: int) -> str:
    """A short hash of everything the examples of ``sources`` depend on."""
    return _hash([sources_key(sources), tokenizer_fingerprint(tokenizer), max_length])


def validated(cache_dir: str, sources: Sequence[Any]) -> bool:
    """Whether these exact files were read and checked before (then a launch need not read them
    again: the examples come from the cache)."""
    return os.path.exists(os.path.join(cache_dir, "validated", sources_key(sources)))


def mark_validated(cache_dir: str, sources: Sequence[Any]) -> None:
    """Record that these exact files passed their checks."""
    folder = os.path.join(cache_dir, "validated")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, sources_key(sources)), "w") as handle:
        handle.write(json.dumps([source_identity(s) for s in sources], default=str))


class ArrowExamples(Sequence[Example]):
    """Read-only examples backed by a memory-mapped Arrow file; ``[i]`` is a dict of tensors.

    Args:
        path: a cache entry written by :func:`write_examples`.
    """

    def __init__(self, path: str) -> None:
        from datasets import Dataset

        self.path = path
        self.dataset = Dataset.from_file(os.path.join(path, ARROW_FILE)).with_format("torch")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return dict(self.dataset[int(index)])


def write_examples(examples: Iterable[Example], folder: str) -> int:
    """Stream examples (dicts of 1-D or 0-D tensors with the same keys) into ``folder`` as one
    Arrow file, :data:`WRITE_BATCH` at a time; returns how many were written."""
    from datasets.arrow_writer import ArrowWriter

    count = 0
    with ArrowWriter(path=os.path.join(folder, ARROW_FILE), writer_batch_size=WRITE_BATCH) as writer:
        for example in examples:
            writer.write({key: value.numpy() for key, value in example.items()})
            count += 1
        if count == 0:
            raise ValueError(f"{folder}: no examples to write")
        writer.finalize()
    return count


def cached_examples(
    cache_dir: str,
    sources: Sequence[Any],
    tokenizer: Any,
    max_length: int,
    build: Callable[[], Iterable[Example]],
) -> ArrowExamples:
    """The examples of ``sources`` from the cache, streaming ``build()`` into it first if missing."""
    path = os.path.join(cache_dir, cache_key(sources, tokenizer, max_length))
    what = "examples of " + ", ".join(source.describe() for source in sources)

    def write(folder: str) -> None:
        write_examples(build(), folder)

    build_once(path, write, what)
    return ArrowExamples(path)
