"""``lit-unlearn fit`` end to end in subprocesses: 2 CPU processes (DDP, gloo) with the default
callbacks and logger match 1 process; SIGTERM then ``--ckpt_path`` resume equals an
uninterrupted run; finished runs are never overwritten."""

from __future__ import annotations

import os
import signal
import stat

import pytest
import torch

from lit_unlearn.benchmarks.synthetic.target import target_dir
from tests.engine_helpers import relative_difference
from tests.integration.cli_helpers import (
    COMPILED,
    ROOT,
    TINY,
    assert_same_evaluations,
    assert_same_layer_geometry,
    evaluation_overlay,
    results,
    run,
    run_dirs,
    saved_weights,
    sigterm_after_first_checkpoint,
    start_until_checkpoint,
    tiny_fit,
)

SGD = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.05"]


def _initial_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(target_dir("smoke"), "model.safetensors"))


# The rules beyond the paper's, through the real CLI (the paper's own rules: the DDP equivalence
# script and the FSDP tests): the projection against all-reduced sums (BLUR), a moving average
# (GRU) and TorchJD's weighting of a reduced Gramian (UPGrad).
RULE_FLAGS = {
    "BLUR": ["--model.synthesizer", "BLUR", "--model.synthesizer.retain_weight", "0.5"],
    "GRU": ["--model.synthesizer", "GRU", "--model.synthesizer.ema", "0.5"],
    "UPGrad": ["--model.synthesizer", os.path.join(ROOT, "configs", "synthesizer", "upgrad.yaml")],
}


@pytest.mark.integration
@pytest.mark.parametrize("rule", list(RULE_FLAGS))
def test_two_process_cli_run_finishes_and_matches_one_process(tmp_path, rule, mc_task):
    common = ["fit", "--config", TINY, "--trainer.max_steps", "6", *SGD, *RULE_FLAGS[rule]]
    if rule == "UPGrad":  # also every data-parallel evaluation: RWKU, membership, lm-eval
        common += ["--config", evaluation_overlay(str(tmp_path), mc_task[0])]
    one = run(
        "lit-unlearn",
        *common,
        "--trainer.default_root_dir",
        str(tmp_path / "one"),
        "--data.forget_batch_size",
        "8",
        "--data.retain_batch_size",
        "8",
    )
    assert one.returncode == 0, one.stderr[-3000:]
    # The timeout is the deadlock detector: a rank stuck in a collective fails here within minutes.
    two = run(
        "lit-unlearn",
        *common,
        "--trainer.default_root_dir",
        str(tmp_path / "two"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.forget_batch_size",
        "4",
        "--data.retain_batch_size",
        "4",
        timeout=240,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    (a,), (b,) = run_dirs(str(tmp_path / "one")), run_dirs(str(tmp_path / "two"))
    ra, rb = results(a), results(b)
    assert ra["world_size"] == 1 and rb["world_size"] == 2
    assert rule in str(ra["synthesizer"]) and ra["synthesizer"] == rb["synthesizer"]
    assert ra["effective_batch"] == rb["effective_batch"] == {"forget": 8, "retain": 8}
    assert ra["steps"] == rb["steps"] == 6
    assert [h["step"] for h in ra["history"]] == [h["step"] for h in rb["history"]] == [0, 5, 6]
    for ha, hb in zip(ra["history"], rb["history"]):
        for key in ha:
            assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), key
    assert rb["geometry"]["points"] == ra["geometry"]["points"] > 0
    assert rb["geometry"]["mean_update_retain_cosine"] == pytest.approx(
        ra["geometry"]["mean_update_retain_cosine"], abs=1e-4
    )
    assert_same_layer_geometry(ra, rb)
    if rule == "UPGrad":
        assert_same_evaluations(ra, rb)
    wa, wb = saved_weights(a), saved_weights(b)
    assert relative_difference(wb, wa, _initial_weights()) <= 1e-4
    for d in (a, b):
        assert os.path.exists(os.path.join(d, "checkpoints", "last.ckpt"))
        assert os.path.exists(os.path.join(d, "manifest.json"))
    assert "TensorBoard logs in" in two.stdout


@pytest.mark.integration
def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The shipped tiny config, no checkpoint flags, the compiled synthesis kernels (the default
    outside the test session): last.ckpt is written on SIGTERM and resumes exactly, the resumed
    process compiling its kernels again."""
    steps = ["--trainer.max_steps", "60"]
    full = run(
        "lit-unlearn",
        "fit",
        "--config",
        TINY,
        *steps,
        "--trainer.default_root_dir",
        str(tmp_path / "full"),
        env=COMPILED,
    )
    assert full.returncode == 0, full.stderr[-3000:]

    root = tmp_path / "cut"
    code, err, ckpt = sigterm_after_first_checkpoint(
        str(root), "fit", "--config", TINY, *steps, "--trainer.default_root_dir", str(root), env=COMPILED
    )
    assert code == 143, err[-3000:]
    assert ckpt is not None
    assert "stopped by SIGTERM after step" in err and "--ckpt_path" in err
    (cut,) = run_dirs(str(root))
    assert not os.path.exists(os.path.join(cut, "unlearned_model")) and not os.path.exists(
        os.path.join(cut, "results.json")
    )
    stopped_at = torch.load(ckpt, weights_only=False)["global_step"]
    assert 5 <= stopped_at < 60

    resumed = run(
        "lit-unlearn",
        "fit",
        "--config",
        TINY,
        *steps,
        "--trainer.default_root_dir",
        str(root),
        "--ckpt_path",
        str(ckpt),
        env=COMPILED,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (full_dir,), (resumed_dir,) = run_dirs(str(tmp_path / "full")), run_dirs(str(root))  # resumed in place
    a, b = results(full_dir), results(resumed_dir)
    assert a["synthesis"]["compiled"] and b["synthesis"]["compiled"]
    assert (
        "synthesis kernels compiled in" in full.stdout and "synthesis kernels compiled in" in resumed.stdout
    )
    for key in ("steps", "final", "history", "matched_step", "geometry", "skipped_steps"):
        assert a[key] == b[key], key
    wa, wb = saved_weights(full_dir), saved_weights(resumed_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical on one machine


@pytest.mark.integration
def test_two_processes_killed_after_an_epoch_end_checkpoint_resume_exactly(tmp_path):
    """DDP on 2 processes, SIGKILL once the periodic last.ckpt exists: with the tiny data every
    4th step ends an epoch (2 global batches per epoch), so the resume starts a new epoch, whose
    batches must all be trained (a skip left over from the finished epoch once ate them)."""
    args = ["--trainer.max_steps", "10", "--checkpoint.every_n_train_steps", "4"]
    args += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    full = run("lit-unlearn", *tiny_fit(tmp_path / "full", *args), timeout=240)
    assert full.returncode == 0, full.stderr[-3000:]

    root = tmp_path / "cut"
    proc, ckpt = start_until_checkpoint(str(root), *tiny_fit(root, *args), timeout=240)
    proc.kill()
    proc.communicate(timeout=60)
    assert ckpt is not None
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] in (4, 8) and saved["UnlearningDataModule"]["batches_consumed"] == 2
    resumed = run("lit-unlearn", *tiny_fit(root, *args), "--ckpt_path", ckpt, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (full_dir,), (resumed_dir,) = run_dirs(str(tmp_path / "full")), run_dirs(str(root))
    a, b = results(full_dir), results(resumed_dir)
    for key in ("steps", "final", "history", "matched_step", "geometry"):
        assert a[key] == b[key], key
    wa, wb = saved_weights(full_dir), saved_weights(resumed_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.integration
def test_a_finished_run_directory_is_never_overwritten(tmp_path):
    fixed = [
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.class_path",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.logger.init_args.name",
        "",
        "--trainer.logger.init_args.version",
        "fixed",
    ]
    first = run("lit-unlearn", *fixed)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "fixed"
    for name in (
        "results.json",
        "manifest.json",
        "config.yaml",
        "unlearned_model/config.json",
        "unlearned_model/model.safetensors",
        "checkpoints/last.ckpt",
    ):
        mode = stat.S_IMODE(os.stat(run_dir / name).st_mode)
        assert mode & 0o644 == 0o644, (name, oct(mode))  # readable by others, as a normal file
    before = (run_dir / "results.json").read_bytes()
    second = run("lit-unlearn", *fixed)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith("lit-unlearn: error: run directory")
    assert str(run_dir) in second.stderr and "Traceback" not in second.stderr
    assert (run_dir / "results.json").read_bytes() == before


@pytest.mark.integration
def test_ctrl_c_finishes_the_step_saves_last_ckpt_and_exits_130(tmp_path):
    args = ["fit", "--config", TINY, "--trainer.max_steps", "60", "--trainer.default_root_dir", str(tmp_path)]
    proc, ckpt = start_until_checkpoint(str(tmp_path), *args)
    assert ckpt is not None
    first_saved = torch.load(ckpt, weights_only=False)["global_step"]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGINT" in err and "Traceback" not in err
    assert torch.load(ckpt, weights_only=False)["global_step"] >= first_saved
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(ckpt)), "unlearned_model"))


NOISE = (
    "_pytree",  # a deprecation inside Lightning
    "Tip:",  # an advertisement
    "Total length of",  # a warning our data module causes on purpose
    "FLOPs",  # the model summary table
    "TPU available",
    "Epoch 3/-2",  # Lightning's epoch counter of a step-bounded run
    "Loading weights",  # transformers' progress bars
    "Writing model shards",
)


@pytest.mark.integration
def test_a_cached_tiny_run_prints_our_lines_and_an_honest_summary(tmp_path, monkeypatch):
    """The shipped tiny config as a user runs it (warnings not silenced): no third-party notices,
    one parameter line, the matched point and the saved model named apart, the overshoot warned
    about, and nothing of the progress bar after the last line."""
    from lit_unlearn.benchmarks.synthetic.target import resolve_synthetic

    monkeypatch.chdir(ROOT)
    resolve_synthetic("synthetic://smoke")  # cached, as for a user's second run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = run("lit-unlearn", "fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in text, noise
    assert text.count("reusing cached model") == 1
    assert text.count("parameters, ") == 1 and "131.0 K trained" in text
    bar = ("━", "Epoch ")
    ours = [
        line
        for line in text.splitlines()
        if line.strip() and not line.startswith(" ") and not any(b in line for b in bar)
    ]
    assert len(ours) <= 13, "\n".join(ours)
    last = proc.stdout.rstrip().splitlines()
    assert last[-1].startswith("lit-unlearn: results.json and TensorBoard logs in")
    summary = [line for line in ours if line.startswith("lit-unlearn: 20 optimizer steps; ")]
    assert summary and "matched point (step 10, first evaluation with forget_qa <= 0.2)" in summary[0]
    run_dir = run_dirs(str(tmp_path))[0]
    r = results(run_dir)
    saved = next(line for line in ours if line.startswith("lit-unlearn: saved model (step 20"))
    assert f"retain_qa={r['final']['retain_qa']:.3f}" in saved  # the saved model's own values
    assert f"retain_qa={r['matched']['retain_qa']:.3f}" in summary[0]
    assert any(line.startswith("lit-unlearn: warning: the matched point overshot") for line in ours)
