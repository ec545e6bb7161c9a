"""What a run leaves on disk when things go wrong, through the real ``lit-unlearn`` command:
a kill in the middle of writing ``last.ckpt`` with ``$TMPDIR`` on another filesystem, the final
evaluation in the final checkpoint, runs started together, a signal during the export, a second
Ctrl-C, and resuming on changed data."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from lit_unlearn.checkpoint_files import VerifiedCheckpointIO
from lit_unlearn.rundir import CLAIM_FILE
from tests.engine_helpers import write_probe_pairs
from tests.integration.cli_helpers import (
    ENV,
    ROOT,
    TINY,
    command,
    last_checkpoint,
    results,
    run,
    run_dirs,
    saved_weights,
    start_until_checkpoint,
    tiny_fit,
)

# Evaluations at steps 0 and 5 and (final) 8; last.ckpt every 2 steps: the periodic save at step 8
# comes before the final evaluation, which the end-of-training save must then include.
OVERLAY = """trainer:
  max_steps: 8
  callbacks:
    - class_path: lit_unlearn.eval.UnlearningEvaluator
      init_args:
        metrics:
          - class_path: lit_unlearn.eval.SyntheticProbes
            init_args: {num_people: 20}
        every_n_steps: 5
        monitor: forget_qa
        target: 0.2
        stop_on_target: false
checkpoint:
  every_n_train_steps: 2
"""
REPORTED = ("steps", "final", "history", "matched", "matched_step", "best", "geometry", "skipped_steps")


def run_patched(
    patch: str, *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """``lit-unlearn`` in a Python process that first runs ``patch`` (to fail at an exact moment)."""
    code = f"import sys\n{patch}\nfrom lit_unlearn.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("overlay") / "eval8.yaml"
    path.write_text(OVERLAY)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, overlay) -> str:
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = run(
        "lit-unlearn", "fit", "--config", TINY, "--config", overlay, "--trainer.default_root_dir", str(root)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(str(root))
    return run_dir


@pytest.fixture()
def tmpdir_elsewhere():
    """``$TMPDIR`` on another filesystem than the runs (``/dev/shm``, a tmpfs), and empty."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    if base is None:
        pytest.skip("no writable /dev/shm")
    path = os.path.join(base, f"lit_unlearn_test_{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.integration
def test_the_final_evaluation_is_in_the_final_checkpoint_and_recovery_reports_it(
    tmp_path, overlay, uninterrupted
):
    done = results(uninterrupted)
    assert [h["step"] for h in done["history"]] == [0, 5, 8]
    ckpt = VerifiedCheckpointIO().load_checkpoint(os.path.join(uninterrupted, "checkpoints", "last.ckpt"))
    assert ckpt["global_step"] == 8
    assert ckpt["callbacks"]["UnlearningEvaluator"]["history"] == done["history"]
    # The documented recovery (after a failed final save): the same command from last.ckpt. The
    # run is finished, so this writes a new directory; what it reports is what the run reported.
    again = run(
        "lit-unlearn",
        "fit",
        "--config",
        TINY,
        "--config",
        overlay,
        "--trainer.default_root_dir",
        str(tmp_path),
        "--ckpt_path",
        os.path.join(uninterrupted, "checkpoints", "last.ckpt"),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    (recovered,) = run_dirs(str(tmp_path))
    for key in REPORTED:
        assert results(recovered)[key] == done[key], key
    a, b = saved_weights(uninterrupted), saved_weights(recovered)
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_IN_THIRD_SAVE = """
import io, os, signal, torch
import lit_unlearn.checkpoint_files as files
real_save, calls = torch.save, [0]
def dying_save(obj, f, *a, **k):
    if not hasattr(f, "write"):
        return real_save(obj, f, *a, **k)
    calls[0] += 1
    if calls[0] < 3:
        return real_save(obj, f, *a, **k)
    buffer = io.BytesIO()
    real_save(obj, buffer, *a, **k)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies half-way through writing the 3rd last.ckpt
files.torch.save = dying_save
"""


@pytest.mark.integration
def test_sigkill_while_writing_last_ckpt_keeps_the_previous_one_and_resume_equals_the_uninterrupted_run(
    tmp_path, overlay, uninterrupted, tmpdir_elsewhere
):
    env = {**ENV, "TMPDIR": tmpdir_elsewhere}
    args = ["fit", "--config", TINY, "--config", overlay, "--trainer.default_root_dir", str(tmp_path)]
    killed = run_patched(KILL_IN_THIRD_SAVE, *args, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt = last_checkpoint(str(tmp_path))
    assert ckpt is not None
    checkpoints = os.path.dirname(ckpt)
    orphans = glob.glob(os.path.join(checkpoints, ".last.ckpt.tmp-*"))
    assert len(orphans) == 1 and 0 < os.path.getsize(orphans[0]) < os.path.getsize(ckpt)
    assert VerifiedCheckpointIO().load_checkpoint(ckpt)["global_step"] == 4  # the 2nd save, intact
    assert os.listdir(tmpdir_elsewhere) == []  # nothing went through $TMPDIR

    resumed = run("lit-unlearn", *args, "--ckpt_path", ckpt, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not glob.glob(os.path.join(checkpoints, ".*"))  # the orphan was removed at the start
    (run_dir,) = run_dirs(str(tmp_path))  # continued in place
    for key in REPORTED:
        assert results(run_dir)[key] == results(uninterrupted)[key], key
    a, b = saved_weights(uninterrupted), saved_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.listdir(tmpdir_elsewhere) == []


SIGTERM_IN_EXPORT = """
import os, signal
import lit_unlearn.rundir as rundir
real_fsync = rundir._fsync_tree
def interrupted(root):
    if "unlearned_model" in root:
        os.kill(os.getpid(), signal.SIGTERM)  # the model files are written, not yet renamed into place
    return real_fsync(root)
rundir._fsync_tree = interrupted
"""


@pytest.mark.integration
def test_sigterm_during_the_export_exits_143_with_the_checkpoint_and_resume_writes_the_outputs(
    tmp_path, overlay, uninterrupted
):
    args = ["fit", "--config", TINY, "--config", overlay, "--trainer.default_root_dir", str(tmp_path)]
    stopped = run_patched(SIGTERM_IN_EXPORT, *args, env=ENV)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    (run_dir,) = run_dirs(str(tmp_path))
    ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
    line = stopped.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("lit-unlearn: SIGTERM while saving the run's outputs")
        and f"--ckpt_path {ckpt}" in line
    )
    for name in ("unlearned_model", "results.json"):
        assert not os.path.exists(os.path.join(run_dir, name)), name
    leftovers = [p for p in glob.glob(os.path.join(run_dir, ".*")) if not p.endswith(CLAIM_FILE)]
    assert not leftovers  # the half-renamed model folder was removed

    resumed = run("lit-unlearn", *args, "--ckpt_path", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dirs(str(tmp_path)) == [run_dir]  # the outputs land in the run's own directory
    for key in REPORTED:
        assert results(run_dir)[key] == results(uninterrupted)[key], key
    a, b = saved_weights(uninterrupted), saved_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_two_identical_runs_started_together_get_their_own_directories(tmp_path):
    args = command("lit-unlearn", *tiny_fit(str(tmp_path), "--trainer.max_steps", "2"))
    procs = [
        subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    dirs = run_dirs(str(tmp_path))
    assert len(dirs) == 2 and {os.path.basename(d).endswith("-2") for d in dirs} == {True, False}
    pids = set()
    for d in dirs:
        for name in (
            "results.json",
            "manifest.json",
            "hparams.yaml",
            "checkpoints/last.ckpt",
            "unlearned_model",
        ):
            assert os.path.exists(os.path.join(d, name)), (d, name)
        assert results(d)["run_dir"] == d
        events = glob.glob(os.path.join(d, "events.out.tfevents.*"))
        assert len(events) == 1
        pids.add(events[0].rsplit(".", 2)[-2])
    assert len(pids) == 2  # each directory was written by one process only


@pytest.mark.integration
def test_a_second_ctrl_c_aborts_with_130_and_names_the_last_checkpoint(tmp_path):
    args = tiny_fit(str(tmp_path), "--trainer.max_steps", "200")
    proc, ckpt = start_until_checkpoint(str(tmp_path), *args)
    assert ckpt is not None
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lit-unlearn: ") and f"--ckpt_path {ckpt}" in line, line
    VerifiedCheckpointIO().load_checkpoint(ckpt)  # intact


@pytest.mark.integration
def test_resuming_on_changed_data_is_refused_unless_allowed(tmp_path):
    forget, retain = write_probe_pairs(str(tmp_path))
    data = ["--data.forget", "lit_unlearn.data.QAPairs", "--data.forget.path", forget]
    data += ["--data.retain", "lit_unlearn.data.QAPairs", "--data.retain.path", retain]
    common = ["fit", "--config", TINY, *data, "--export.enabled", "false", "--trainer.default_root_dir"]
    first = run("lit-unlearn", *common, str(tmp_path / "a"), "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = last_checkpoint(str(tmp_path / "a"))
    with open(forget, "a") as handle:
        handle.write(json.dumps({"question": "who wrote the new line ?", "answer": "nobody"}) + "\n")
    resume = [*common, str(tmp_path / "b"), "--trainer.max_steps", "3", "--ckpt_path", ckpt]
    refused = run("lit-unlearn", *resume)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("lit-unlearn: error: --ckpt_path: the training data changed") and forget in line
    assert "--resume.allow_data_change true" in line and "Traceback" not in refused.stderr
    allowed = run("lit-unlearn", *resume, "--resume.allow_data_change", "true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]


@pytest.mark.integration
def test_a_run_directory_in_use_is_refused_to_a_second_process(tmp_path):
    """Resuming a run while it is still running (two jobs on one checkpoint) is refused: the
    running process holds its directory."""
    args = tiny_fit(str(tmp_path), "--trainer.max_steps", "200")
    running, ckpt = start_until_checkpoint(str(tmp_path), *args)
    try:
        assert ckpt is not None
        run_dir = os.path.dirname(os.path.dirname(ckpt))
        second = run("lit-unlearn", *args, "--ckpt_path", ckpt)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert f"run directory {run_dir} is in use by another lit-unlearn process (pid {running.pid})" in line
    finally:
        running.send_signal(signal.SIGTERM)
        running.communicate(timeout=120)
    assert running.returncode == 143  # the first run was not disturbed: it stops and saves as usual
