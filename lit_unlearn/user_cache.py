"""One cache folder per machine for what lit_unlearn builds once and reuses: the synthetic target
models and the tokenized-example cache.

Where: ``$LIT_UNLEARN_CACHE`` if set, else ``$XDG_CACHE_HOME/lit_unlearn``, else
``~/.cache/lit_unlearn`` — never the working directory, so runs started from different folders
(or on different nodes sharing a home directory) build each entry once.

An *entry* is a directory written by :func:`build_once`: concurrent builders (ranks, nodes, two
runs) take a file lock next to it, the first builds into a temporary sibling, seals it with a
manifest of every file's size and SHA-256, and renames it into place; everyone else waits and
reuses it. An entry whose files no longer match their manifest (a truncated or damaged file, a
directory left by an older version) is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable

from lit_unlearn.rundir import atomic_directory

log = logging.getLogger(__name__)

ENV = "LIT_UNLEARN_CACHE"
MANIFEST = ".lit_unlearn_entry.json"


def cache_root() -> str:
    """The machine's lit_unlearn cache folder (not created here)."""
    if os.environ.get(ENV):
        return os.path.abspath(os.path.expanduser(os.environ[ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "lit_unlearn")


def _digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for parent, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(parent, n), folder) for n in names if n != MANIFEST]
    return sorted(out)


def seal(folder: str) -> None:
    """Write the manifest of ``folder``: every file's size and SHA-256."""
    files = {
        rel: [os.path.getsize(os.path.join(folder, rel)), _digest(os.path.join(folder, rel))]
        for rel in _files(folder)
    }
    with open(os.path.join(folder, MANIFEST), "w") as handle:
        json.dump({"files": files}, handle, indent=1)


def damage(folder: str) -> str | None:
    """``None`` when ``folder`` is a complete, sealed entry; otherwise what is wrong with it."""
    try:
        with open(os.path.join(folder, MANIFEST)) as handle:
            files = json.load(handle)["files"]
    except FileNotFoundError:
        return "no manifest (unfinished, or written by an older version)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    present = set(_files(folder))
    if present != set(files):
        return f"files differ from its manifest ({sorted(present ^ set(files))[:3]})"
    for rel, (size, digest) in files.items():
        path = os.path.join(folder, rel)
        if os.path.getsize(path) != size:
            return f"{rel}: {os.path.getsize(path)} bytes, {size} expected"
        if _digest(path) != digest:
            return f"{rel}: content changed (checksum mismatch)"
    return None


def build_once(path: str, build: Callable[[str], None], what: str) -> bool:
    """Make ``path`` a complete entry: build it with ``build(folder)`` unless a sealed, intact one
    is there. Safe under concurrency (one builder, the others wait and reuse). Returns whether
    this call built it."""
    if os.path.isdir(path) and damage(path) is None:
        return False
    from filelock import FileLock

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileLock(path + ".lock"):
        exists = os.path.isdir(path)
        if exists:
            problem = damage(path)
            if problem is None:
                return False  # another process built it while this one waited
            log.warning("%s: the cached copy in %s is damaged (%s); rebuilding it", what, path, problem)
        with atomic_directory(path, replace=exists) as folder:
            build(folder)
            seal(folder)
    return True
