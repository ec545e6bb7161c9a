"""The run directory: where a run's files go, and the rules that keep earlier runs safe.

- :class:`RunLogger` (the CLI's default logger) names the directory after the run:
  ``<root>/<benchmark>/<forget>+<retain>_<synthesizer>/lr<lr>_seed<seed>``, and takes the next
  free ``-2``, ``-3``, ... rather than write into a directory that is in use.
- :func:`run_directory` is the one way to ask for it (``trainer.log_dir`` broadcasts under DDP,
  so every rank must call it, never rank 0 alone).
- :func:`check_run_directory` refuses a directory that holds a finished run (``results.json`` or
  ``unlearned_model/``), or an unfinished one unless the run resumes from a checkpoint.
- :func:`save_pretrained_atomic` writes ``unlearned_model/`` into a temporary directory and
  renames it, so a crash never leaves a half-written model; :func:`write_json_atomic` does the
  same for JSON files. Files get the usual permissions (0644 / 0755 under the default umask).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_unlearn.errors import UserError

MODEL_DIR = "unlearned_model"
_VERSION_ENV = "LIT_UNLEARN_RUN_VERSION"  # rank 0's choice, inherited by the processes it launches
RESULTS_FILE = "results.json"


def run_directory(trainer: Any) -> str:
    """The run directory (the logger's ``version_N``, else ``default_root_dir``). Collective:
    call it on every rank."""
    return trainer.log_dir or trainer.default_root_dir


def local_run_directory(trainer: Any) -> str:
    """This rank's view of the run directory, without a collective (rank 0's is the one the
    others receive)."""
    return getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir


class RunLogger(TensorBoardLogger):
    """TensorBoard logger with a run directory named after what the run is.

    The directory is ``<save_dir>/<name>/<version>``. ``lit-unlearn fit`` fills in what is left
    unset: ``save_dir`` = ``--trainer.default_root_dir``, ``name`` = the benchmark (from the data),
    ``version`` = ``<forget objective>+<retain objective>_<synthesizer>/lr<lr>_seed<seed>``, and
    when resuming from ``<dir>/checkpoints/last.ckpt``, ``<dir>`` itself. A directory that already
    holds files is never reused by a new run: the next free ``<version>-2``, ``-3``, ... is taken
    (an explicit ``version`` is used as given, and a finished run there is refused).

    Args:
        save_dir: root folder of the runs (default: the CLI's ``--trainer.default_root_dir``).
        name: first level below it, e.g. the benchmark (``wmdp_bio``).
        version: the rest of the path; may contain ``/``.
        unique: take the next free ``-N`` suffix instead of reusing a directory that holds files.
        default_hp_metric: write TensorBoard's placeholder ``hp_metric`` (off: the HParams view
            points at the evaluation curves instead).
    """

    def __init__(
        self,
        save_dir: str = "runs",
        name: str = "",
        version: str | None = None,
        unique: bool = True,
        default_hp_metric: bool = False,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, default_hp_metric=default_hp_metric)
        self.unique = unique
        self._resolved: str | None = None

    @rank_zero_only
    def log_hyperparams(
        self, params: Any, metrics: dict[str, Any] | None = None, step: int | None = None
    ) -> None:
        """Record hyper-parameters (``hparams.yaml``); with ``metrics``, also the HParams view,
        whose metric columns read the last value of those existing curves (no step-0 copies)."""
        super().log_hyperparams(params, step=step)
        if metrics:
            from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
            from torch.utils.tensorboard.summary import hparams

            flat = self._sanitize_params(_flatten_dict(_convert_params(params)))
            writer = self.experiment._get_file_writer()
            for summary in hparams(flat, metrics):
                writer.add_summary(summary)
            writer.flush()

    @property
    def version(self) -> str | int:
        """The version path; resolved once (rank 0 probes, processes it launches inherit it)."""
        if self._resolved is None:
            base = self._version if self._version is not None else f"version_{self._get_next_version()}"
            self._resolved = self._free(str(base)) if self.unique else str(base)
        return self._resolved

    def _free(self, base: str) -> str:
        # Processes launched by this one (DDP ranks re-running the command) must not probe: by
        # then rank 0 may have created the directory, and they would pick the next suffix.
        key = f"{self.root_dir}|{base}|"
        parent, _, choice = os.environ.get(_VERSION_ENV, "").partition(":")
        if parent == str(os.getppid()) and choice.startswith(key):
            return choice[len(key) :]
        candidate, n = base, 1
        while _holds_files(os.path.join(self.root_dir, candidate)):
            n += 1
            candidate = f"{base}-{n}"
        os.environ[_VERSION_ENV] = f"{os.getpid()}:{key}{candidate}"
        return candidate


def _holds_files(path: str) -> bool:
    return os.path.isdir(path) and any(os.scandir(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finished_outputs(run_dir: str) -> list[str]:
    """The outputs of a finished run present in ``run_dir`` (``results.json``, ``unlearned_model/``)."""
    return [name for name in (RESULTS_FILE, MODEL_DIR) if os.path.exists(os.path.join(run_dir, name))]


def check_run_directory(run_dir: str, resuming: bool) -> None:
    """Refuse to write into ``run_dir`` when that would replace an earlier run's outputs."""
    if not os.path.isdir(run_dir):
        return
    finished = finished_outputs(run_dir)
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


def _unwrap_architectures(config_path: str, model: Any) -> None:
    """FSDP2 swaps a module's class for a generated ``FSDP<Name>`` subclass; record ``<Name>``."""
    wrapped = type(model).__name__
    if not wrapped.startswith("FSDP") or not os.path.exists(config_path):
        return
    with open(config_path) as handle:
        config = json.load(handle)
    base = next(c for c in type(model).__mro__[1:] if not c.__name__.startswith("FSDP"))
    config["architectures"] = [base.__name__]
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


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


@contextlib.contextmanager
def atomic_directory(path: str, replace: bool = False) -> Iterator[str]:
    """Fill a temporary sibling of ``path`` (yielded); on success it is renamed to ``path``, on
    any error it is removed, so ``path`` is either complete or absent. ``replace``: remove an
    existing ``path`` first (otherwise the rename fails if it exists). Normal permissions."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}-")
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if replace and os.path.isdir(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained_atomic(
    model: Any, tokenizer: Any, run_dir: str, name: str = MODEL_DIR, state_dict: dict[str, Any] | None = None
) -> str:
    """``save_pretrained`` model (and tokenizer) as ``run_dir/name``, all or nothing.

    ``state_dict``: the full weights of a sharded model (see ``models.gathered_state_dict``); the
    saved directory is then an ordinary, unsharded checkpoint. Refuses to replace an existing
    directory. If the save fails, the temporary directory is removed and the error propagates.
    """
    out = os.path.join(run_dir, name)
    if os.path.exists(out):
        raise UserError(f"{out} already exists; an earlier run's model is never replaced")
    with atomic_directory(out) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
            _unwrap_architectures(os.path.join(tmp, "config.json"), model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
