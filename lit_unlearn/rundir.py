"""The run directory: where a run's files go, and the rules that keep earlier runs safe.

- :func:`run_directory` is the one way to ask for it (``trainer.log_dir`` broadcasts under DDP,
  so every rank must call it, never rank 0 alone).
- :func:`check_run_directory` refuses a directory that holds a finished run (``results.json`` or
  ``unlearned_model/``), or an unfinished one unless the run resumes from a checkpoint.
- :func:`save_pretrained_atomic` writes ``unlearned_model/`` into a temporary directory and
  renames it, so a crash never leaves a half-written model; :func:`write_json_atomic` does the
  same for JSON files. Files get the usual permissions (0644 / 0755 under the default umask).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from lit_unlearn.errors import UserError

MODEL_DIR = "unlearned_model"
RESULTS_FILE = "results.json"


def run_directory(trainer: Any) -> str:
    """The run directory (the logger's ``version_N``, else ``default_root_dir``). Collective:
    call it on every rank."""
    return trainer.log_dir or trainer.default_root_dir


def local_run_directory(trainer: Any) -> str:
    """This rank's view of the run directory, without a collective (rank 0's is the one the
    others receive)."""
    return getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_run_directory(run_dir: str, resuming: bool) -> None:
    """Refuse to write into ``run_dir`` when that would replace an earlier run's outputs."""
    if not os.path.isdir(run_dir):
        return
    finished = [name for name in (RESULTS_FILE, MODEL_DIR) if os.path.exists(os.path.join(run_dir, name))]
    if finished:
        raise UserError(
            f"run directory {run_dir} already holds a finished run ({', '.join(finished)}); "
            "choose another --trainer.default_root_dir or logger version, or move it away"
        )
    if not resuming and os.path.exists(os.path.join(run_dir, "config.yaml")):
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        hint = f"resume it with --ckpt_path {last}" if os.path.exists(last) else "move it away"
        raise UserError(
            f"run directory {run_dir} holds an unfinished run: {hint}, or choose another directory"
        )


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place (mode 0644)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=float)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained_atomic(model: Any, tokenizer: Any, run_dir: str, name: str = MODEL_DIR) -> str:
    """``save_pretrained`` model (and tokenizer) as ``run_dir/name``, all or nothing.

    Refuses to replace an existing directory. If the save fails, the temporary directory is
    removed and the error propagates.
    """
    out = os.path.join(run_dir, name)
    if os.path.exists(out):
        raise UserError(f"{out} already exists; an earlier run's model is never replaced")
    os.makedirs(run_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=run_dir, prefix=f".{name}-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
