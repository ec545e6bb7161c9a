"""Checkpoint files that survive any filesystem, and refuse to load when damaged.

Lightning's default writer stages a checkpoint in ``$TMPDIR`` and moves it into place. When
``$TMPDIR`` is on another filesystem than the run (a tmpfs ``/tmp``; local scratch beside NFS or
Lustre on clusters) that move is a copy over the old file: a kill or a full disk during the copy
destroys the last good checkpoint, and every save needs the checkpoint's full size free in
``$TMPDIR``. Here every file is written beside its destination under a temporary name, flushed
and fsynced, then renamed over the old one (:func:`replace_file`, :func:`replace_directory`), so
the destination always holds either the old complete checkpoint or the new complete one.

A single-file checkpoint records a digest of its tensors (:func:`tensor_digest`, under
``DIGEST_KEY``); a sharded (directory) checkpoint records one of its files (``DIGEST_FILE``).
:class:`VerifiedCheckpointIO` checks it when the checkpoint is read; :func:`check_checkpoint`
does the cheap checks (exists, readable archive, digest file) before a model is loaded. Either
raises a one-line :class:`~lit_unlearn.errors.UserError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_unlearn.errors import UserError

DIGEST_KEY = "lit_unlearn_digest"
DIGEST_FILE = "lit_unlearn_digest.json"
TEMP_MARK = ".tmp-"  # temporary names: ".<name>.tmp-<pid>-<random>"
OLD_MARK = ".old-"  # a directory checkpoint moved aside while its successor is renamed in
_CHUNK = 1 << 24
_VERIFIED: set[tuple[str, int, int, str]] = set()  # checkpoint files whose digest matched in this process


def _hasher() -> Any:
    # xxh3 hashes at memory speed (a 7 B model's optimizer state in seconds); ``datasets``
    # depends on xxhash, so it is always installed with us.
    import xxhash

    return xxhash.xxh3_128()


def temporary_name(path: str) -> str:
    """A fresh temporary name in ``path``'s own directory (so the final rename stays on one filesystem)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def replace_file(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file beside it, fsync, rename.

    The previous ``path`` stays intact until the rename; on any failure (a full disk, an
    exception, a signal) the temporary file is removed and the error propagates. Mode 0666 minus
    the umask, as for any new file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def replace_directory(tmp: str, path: str) -> None:
    """Rename the complete directory ``tmp`` to ``path``, replacing an existing one.

    A directory cannot be renamed over a non-empty one, so the old one is first moved aside
    (``.<name>.old-*``) and removed after the new one is in place; :func:`remove_orphans` puts it
    back if the process dies in between.
    """
    old = None
    if os.path.lexists(path):
        directory, name = os.path.split(os.path.abspath(path))
        old = os.path.join(directory, f".{name}{OLD_MARK}{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.unlink(old)


def remove_orphans(directory: str, names: tuple[str, ...] | None = None) -> list[str]:
    """Remove what killed saves left in ``directory``: temporary files and folders, and old
    checkpoints moved aside (restored instead when their successor never arrived). ``names``:
    only leftovers of these final names (default: any). Returns what was removed or restored."""
    if not os.path.isdir(directory):
        return []
    done = []
    for entry in sorted(os.listdir(directory)):
        if not entry.startswith("."):
            continue
        for mark in (TEMP_MARK, OLD_MARK):
            base, found, _ = entry[1:].partition(mark)
            if not found or (names is not None and base not in names):
                continue
            path, final = os.path.join(directory, entry), os.path.join(directory, base)
            if mark == OLD_MARK and not os.path.lexists(final):
                os.rename(path, final)  # the swap died after moving the old one aside: put it back
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            done.append(path)
    return done


# ---------------------------------------------------------------------- digests
def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{path}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}/{i}")


def tensor_digest(checkpoint: dict[str, Any]) -> str:
    """xxh3-128 over every tensor of ``checkpoint`` (its place, dtype, shape and bytes), in the
    dictionary's own order (which saving and loading keep). ``DIGEST_KEY`` itself is left out."""
    h = _hasher()
    for place, tensor in _tensors({k: v for k, v in checkpoint.items() if k != DIGEST_KEY}):
        t = tensor.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous().reshape(-1)
        h.update(f"{place}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)  # no copy
    return h.hexdigest()


def file_digests(directory: str) -> dict[str, str]:
    """xxh3-128 of every file under ``directory`` (relative path -> hex), the digest file excepted."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel == DIGEST_FILE:
                continue
            h = _hasher()
            with open(full, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return dict(sorted(out.items()))


def write_directory_digest(directory: str) -> None:
    """Record :func:`file_digests` in ``directory/DIGEST_FILE`` (fsynced)."""
    payload = json.dumps(file_digests(directory), indent=1).encode()
    replace_file(os.path.join(directory, DIGEST_FILE), lambda handle: handle.write(payload))


def _refuse(path: str, what: str) -> UserError:
    return UserError(
        f"--ckpt_path {path}: {what}; resume from an intact checkpoint (an earlier copy of "
        "last.ckpt) or start the run again"
    )


def check_checkpoint(path: str) -> None:
    """Cheap checks before anything is loaded: the path exists, a file is a complete archive, a
    directory's files match its digest file. Raises a one-line :class:`UserError`."""
    if not os.path.exists(path):
        raise UserError(f"--ckpt_path {path}: file not found")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")) or os.path.exists(
            os.path.join(path, "checkpoints")
        ):
            raise UserError(
                f"--ckpt_path {path}: this is a model or run directory, not a training checkpoint; "
                f"resume from <run dir>/checkpoints/last.ckpt"
            )
        digest = os.path.join(path, DIGEST_FILE)
        if not os.path.exists(digest):
            if not os.path.exists(os.path.join(path, "meta.pt")):
                raise _refuse(path, "not a lit-unlearn checkpoint (no meta.pt)")
            return  # a sharded checkpoint written before digests existed
        with open(digest) as handle:
            expected = json.load(handle)
        actual = file_digests(path)
        bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        if bad:
            raise _refuse(path, f"corrupted ({len(bad)} file(s) differ from its digest, e.g. {bad[0]})")
        return
    if os.path.getsize(path) == 0:
        raise _refuse(path, "the file is empty (a save was interrupted)")
    if not zipfile.is_zipfile(path):
        raise _refuse(path, "not a PyTorch checkpoint archive (truncated, corrupted or another kind of file)")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _refuse(path, f"unreadable archive ({err})") from err


def verify_loaded(path: str, checkpoint: Any) -> dict[str, Any]:
    """Refuse a loaded object that is not a lit-unlearn checkpoint, or whose tensors differ from
    the digest saved with them; returns the checkpoint without the digest."""
    if not isinstance(checkpoint, dict) or "lit_unlearn" not in checkpoint or "state_dict" not in checkpoint:
        raise _refuse(path, "not a lit-unlearn training checkpoint (no lit_unlearn/state_dict entries)")
    expected = checkpoint.pop(DIGEST_KEY, None)
    if expected is None:
        return checkpoint
    # Lightning's CLI and then the Trainer each read a resumed checkpoint: hash it once per process
    key = (os.path.abspath(path), os.path.getsize(path), os.stat(path).st_mtime_ns, expected)
    if key not in _VERIFIED:
        if tensor_digest(checkpoint) != expected:
            raise _refuse(path, "corrupted (its tensors do not match the digest saved with them)")
        _VERIFIED.add(key)
    return checkpoint


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes in place (:func:`replace_file`, never through
    ``$TMPDIR``), records a tensor digest, and refuses damaged or foreign checkpoints in one line."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("VerifiedCheckpointIO.save_checkpoint takes no storage_options")
        checkpoint = {**checkpoint, DIGEST_KEY: tensor_digest(checkpoint)}
        replace_file(str(path), lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = str(path)
        check_checkpoint(path)
        try:
            loaded = torch.load(
                path,
                map_location=map_location or (lambda storage, loc: storage),
                weights_only=True if weights_only is None else weights_only,
            )
        except Exception as err:  # a truncated or corrupted archive, or pickled code
            raise _refuse(
                path, f"unreadable ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
            ) from err
        return verify_loaded(path, loaded)
