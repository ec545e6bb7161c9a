"""The run directory: where a run's files go, and the rules that keep earlier runs safe.

- :class:`RunLogger` (the CLI's default logger) names the directory after the run:
  ``<root>/<benchmark>/<synthesizer>_<forget>+<retain>/lr<lr>_seed<seed>_<digest>``, the digest
  naming every other setting, and claims it by creating ``.lit_unlearn_run`` in it exclusively
  (the next free ``-2``, ``-3``, ... when it is taken), so two runs never write into one directory.
- :func:`run_directory` is the one way to ask for it (``trainer.log_dir`` broadcasts under DDP,
  so every rank must call it, never rank 0 alone).
- :func:`check_run_directory` refuses a directory that holds a finished run (``results.json`` or
  ``unlearned_model/``), or an unfinished one unless the run resumes from a checkpoint, and then
  holds the directory with a lock (:func:`lock_run_directory`) for the life of the process, so
  the same run resumed twice at once is refused.
- :func:`save_pretrained_atomic` writes ``unlearned_model/`` into a temporary directory and
  renames it, so a crash never leaves a half-written model; :func:`write_json_atomic` does the
  same for JSON files. Files get the usual permissions (0644 / 0755 under the default umask).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_unlearn.checkpoint_files import replace_directory, replace_file, temporary_name
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
    ``version`` = ``<synthesizer>_<forget objective>+<retain objective>/lr<lr>_seed<seed>_<digest>``
    (the digest: 8 hex digits of the resolved configuration, so runs of a sweep that differ in
    any setting get different directories), and when resuming from
    ``<dir>/checkpoints/last.ckpt``, ``<dir>`` itself. The directory is claimed atomically (an
    exclusive create of ``.lit_unlearn_run`` in an empty directory: exactly one process
    succeeds); a new run never enters a directory that holds anything but takes the next free
    ``<version>-2``, ``-3``, ... (with ``unique: false`` an explicit ``version`` is used as given,
    and a finished run there is refused).

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
        self,
        params: Any,
        metrics: dict[str, Any] | None = None,
        step: int | None = None,
        *,
        leading: Sequence[str] = (),
        names: dict[str, str] | None = None,
    ) -> None:
        """Record hyper-parameters (``hparams.yaml``); with ``metrics``, also the HParams entry,
        whose metric columns read the last value of those scalar tags (in the order given), and
        whose hyper-parameter columns named in ``leading`` come first and are shown by default
        (TensorBoard puts the columns marked as differing between runs first, then by name, and
        shows five); ``names`` gives metric columns a name other than their tag."""
        super().log_hyperparams(params, step=step)
        if metrics:
            from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
            from tensorboard.plugins.hparams import plugin_data_pb2
            from torch.utils.tensorboard.summary import hparams

            flat = self._sanitize_params(_flatten_dict(_convert_params(params)))
            experiment, start, end = hparams(flat, metrics)
            plugin = experiment.value[0].metadata.plugin_data
            data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
            for info in data.experiment.hparam_infos:
                info.differs = info.name in leading
            for metric in data.experiment.metric_infos:
                metric.display_name = (names or {}).get(metric.name.tag, "")
            plugin.content = data.SerializeToString()
            writer = self.experiment._get_file_writer()
            for summary in (experiment, start, end):
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
        # then rank 0 has claimed the directory, and they would pick the next suffix.
        key = f"{self.root_dir}|{base}|"
        parent, _, choice = os.environ.get(_VERSION_ENV, "").partition(":")
        if parent == str(os.getppid()) and choice.startswith(key):
            return choice[len(key) :]
        candidate = claim_directory(self.root_dir, base)
        os.environ[_VERSION_ENV] = f"{os.getpid()}:{key}{candidate}"
        return candidate


CLAIM_FILE = ".lit_unlearn_run"  # created exclusively: the run that created it owns the directory


def claim_directory(root: str, base: str) -> str:
    """Claim ``root/base`` (or the first free ``base-2``, ``base-3``, ...) for a new run and
    return the name taken. The claim is the exclusive creation of ``CLAIM_FILE`` in an empty
    directory: it succeeds for exactly one process, so runs started at the same moment (a sweep,
    an array job) never share a directory, and a directory holding anything else (an earlier
    run's files) is never entered."""
    n = 1
    while True:
        candidate = base if n == 1 else (f"{base}-{n}" if base else f"run-{n}")
        path = os.path.join(root, candidate) if candidate else root
        os.makedirs(path, exist_ok=True)
        if not set(os.listdir(path)) - {CLAIM_FILE}:
            try:
                fd = os.open(os.path.join(path, CLAIM_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                pass  # another process claimed it a moment ago
            else:
                os.write(fd, f"{os.getpid()}\n".encode())
                os.close(fd)
                _CLAIMED.append(path)
                atexit.register(_remove_if_empty, path)
                return candidate
        n += 1


_CLAIMED: list[str] = []  # run directories this process claimed
_START_FILES = ("config.yaml", "hparams.yaml", "manifest.json", "events.out.tfevents.")


def _remove_if_empty(path: str) -> None:
    """Undo a claim whose run never wrote anything (it failed before starting)."""
    with contextlib.suppress(OSError):
        if set(os.listdir(path)) == {CLAIM_FILE}:
            os.unlink(os.path.join(path, CLAIM_FILE))
            os.rmdir(path)


def release_claims() -> list[str]:
    """Remove the run directories this process claimed that hold only what a start writes
    (config, hyper-parameters, manifest, an events file): after a refused input nothing is left
    behind. A directory with a checkpoint, results or a model is never touched."""
    removed = []
    for path in _CLAIMED:
        if not os.path.isdir(path):
            continue
        entries = os.listdir(path)
        ckpt_dir = os.path.join(path, "checkpoints")
        if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
            continue
        if all(e in ("checkpoints", CLAIM_FILE) or e.startswith(_START_FILES) for e in entries):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finished_outputs(run_dir: str) -> list[str]:
    """The outputs of a finished run present in ``run_dir`` (``results.json``, ``unlearned_model/``)."""
    return [name for name in (RESULTS_FILE, MODEL_DIR) if os.path.exists(os.path.join(run_dir, name))]


_LOCKS: list[int] = []  # open descriptors of the run directories this process holds


def lock_run_directory(run_dir: str) -> None:
    """Hold an exclusive lock on ``run_dir`` (on its ``CLAIM_FILE``) until this process exits, so
    two processes never run in one directory: e.g. the same run resumed twice at once. The
    lock is released by the operating system when the process ends, however it ends."""
    import fcntl

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CLAIM_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").split()
        os.close(fd)
        who = f" (pid {holder[-1]})" if holder else ""
        raise UserError(
            f"run directory {run_dir} is in use by another lit-unlearn process{who}; wait for it to "
            "finish (or stop it) before resuming this run"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS.append(fd)


def check_run_directory(run_dir: str, resuming: bool) -> None:
    """Refuse to write into ``run_dir`` when that would replace an earlier run's outputs, or while
    another process runs in it; then hold it (:func:`lock_run_directory`)."""
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
    lock_run_directory(run_dir)


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
    """Write JSON to a temporary file beside ``path``, fsync it and rename it into place (mode
    0666 minus the umask). ``path`` is either the old file or the new one, never a partial one."""
    text = json.dumps(payload, indent=2, default=float).encode()
    replace_file(path, lambda handle: handle.write(text))


def _normal_permissions(root: str) -> None:
    """Give every file under ``root`` the permissions of a newly created file (some writers, e.g.
    safetensors through a temporary file, leave 0600)."""
    file_mode, dir_mode = 0o666 & ~_umask(), 0o777 & ~_umask()
    for directory, _, files in os.walk(root):
        os.chmod(directory, dir_mode)
        for name in files:
            full = os.path.join(directory, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            full = os.path.join(directory, name)
            if os.path.islink(full):
                continue
            with open(full, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(path: str, replace: bool = False) -> Iterator[str]:
    """Fill a temporary sibling of ``path`` (yielded); on success its files are fsynced and it is
    renamed to ``path``; on any error it is removed, so ``path`` is either complete or absent
    (a killed process leaves only the temporary sibling, which ``remove_orphans`` clears when
    the run directory is next used). ``replace``: swap out an existing ``path`` (otherwise
    the rename fails if it exists). Normal permissions."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = temporary_name(path)
    os.mkdir(tmp)
    try:
        yield tmp
        _normal_permissions(tmp)
        _fsync_tree(tmp)
        if replace:
            replace_directory(tmp, path)  # the old one moved aside, never removed before the new one is in
        else:
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
