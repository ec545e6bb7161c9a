"""Tokenize once, memory-map everywhere: the on-disk example cache.

Building examples (reading, tokenizing and chunking a corpus) happens once, in
``UnlearningDataModule.prepare_data`` — Lightning runs it on one process per node before the
others start — and the result is written as an Arrow dataset (``datasets``) under the cache
directory. Every rank, and every later launch, then *memory-maps* it: no rank tokenizes, and no
rank holds the corpus in its own memory (the pages are shared through the OS page cache).

The cache key covers everything the examples depend on: the sources' classes and settings, the
size and modification time of every file they name (a hub dataset is identified by its name and
``revision``: pin the revision to be sure a cached copy matches), the tokenizer (its name, size and, for fast
tokenizers, its full definition), ``max_length`` and the cache format. A changed file or setting
builds a new entry; entries are written to a temporary name and renamed, so a crash never leaves
a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor

from lit_unlearn.logs import describe
from lit_unlearn.rundir import atomic_directory

FORMAT = 2  # 2: alternate answers stored with the examples; bump when the stored layout changes
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
    """Read-only examples backed by a memory-mapped Arrow dataset; ``[i]`` is a dict of tensors.

    Args:
        path: a directory written by :func:`write_examples`.
    """

    def __init__(self, path: str) -> None:
        from datasets import load_from_disk

        self.path = path
        self.dataset = load_from_disk(path).with_format("torch")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return dict(self.dataset[int(index)])


def write_examples(examples: Sequence[Example], path: str) -> None:
    """Store examples (dicts of 1-D or 0-D tensors with the same keys) at ``path``, atomically."""
    from datasets import Dataset

    columns = {key: [example[key].numpy() for example in examples] for key in examples[0]}
    try:
        with atomic_directory(path) as tmp:
            Dataset.from_dict(columns).save_to_disk(tmp)
    except OSError:
        if not os.path.isdir(path):  # another process finished the same entry first: fine
            raise


def cached_examples(
    cache_dir: str,
    sources: Sequence[Any],
    tokenizer: Any,
    max_length: int,
    build: Callable[[], list[Example]],
) -> ArrowExamples:
    """The examples of ``sources`` from the cache, building and writing them first if missing."""
    path = os.path.join(cache_dir, cache_key(sources, tokenizer, max_length))
    if not os.path.isdir(path):
        write_examples(build(), path)
    return ArrowExamples(path)
