"""Run directories: claimed by exactly one process, named after every setting, and left clean
when a run is refused before it starts."""

from __future__ import annotations

import multiprocessing
import os

from jsonargparse import Namespace

from lit_unlearn.cli import config_digest, run_name
from lit_unlearn.rundir import CLAIM_FILE, claim_directory, release_claims


def _all_ready(barrier) -> None:
    barrier.wait()  # every worker has imported the package: they claim at the same moment


def _claim(args: tuple[str, str]) -> str:
    name = claim_directory(*args)
    # a claim whose process exits having written nothing is undone; a run writes its config
    with open(os.path.join(args[0], name, "config.yaml"), "w") as handle:
        handle.write(name)
    return name


def test_processes_claiming_one_name_at_once_each_get_their_own_directory(tmp_path):
    # spawn, not fork: a fork of a test process that has started threads (torch, TensorBoard) can
    # inherit a held lock and hang forever (it did once, in CI)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    with context.Pool(4, initializer=_all_ready, initargs=(barrier,)) as pool:
        names = pool.map(_claim, [(str(tmp_path), "synthetic/m/lr0.001_seed0_ab")] * 8, chunksize=2)
    assert len(set(names)) == 8
    assert sorted(names)[0] == "synthetic/m/lr0.001_seed0_ab"
    for name in names:  # each directory was written by its own process only
        assert sorted(os.listdir(tmp_path / name)) == sorted([CLAIM_FILE, "config.yaml"])
        assert (tmp_path / name / "config.yaml").read_text() == name


def test_a_directory_holding_files_is_never_claimed(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    assert claim_directory(str(tmp_path), "run") == "run-2"
    (tmp_path / "empty").mkdir()  # an empty directory (e.g. made by hand) can be claimed once
    assert claim_directory(str(tmp_path), "empty") == "empty"
    assert claim_directory(str(tmp_path), "empty") == "empty-2"


def test_release_removes_a_refused_runs_directory_but_never_a_checkpointed_one(tmp_path):
    refused = claim_directory(str(tmp_path), "refused")
    (tmp_path / refused / "config.yaml").write_text("x")
    (tmp_path / refused / "events.out.tfevents.1.host.1.0").write_text("x")
    kept = claim_directory(str(tmp_path), "kept")
    (tmp_path / kept / "checkpoints").mkdir()
    (tmp_path / kept / "checkpoints" / "last.ckpt").write_text("x")
    removed = release_claims()
    assert str(tmp_path / refused) in removed and not (tmp_path / refused).exists()
    assert (tmp_path / kept / "checkpoints" / "last.ckpt").exists()


def _config(retain_weight: float, root: str = "runs") -> Namespace:
    synth = Namespace(
        class_path="lit_unlearn.synthesis.SAGO", init_args=Namespace(retain_weight=retain_weight)
    )
    return Namespace(
        seed_everything=0,
        ckpt_path=None,
        config=["a.yaml"],
        trainer=Namespace(default_root_dir=root, max_steps=20, logger=Namespace(class_path="x")),
        model=Namespace(synthesizer=synth, optimizer=Namespace(init_args=Namespace(lr=1e-3))),
        data=Namespace(forget=Namespace(class_path="lit_unlearn.benchmarks.synthetic.SyntheticKnowledge")),
    )


def test_runs_that_differ_only_in_one_setting_get_different_names():
    a, b = run_name(_config(1.0)), run_name(_config(2.0))
    assert a != b and a[1].startswith("SAGO_GradientAscent+NLL/lr0.001_seed0_")
    # where the run is written, and which files set it up, do not change its name
    assert config_digest(_config(1.0, root="elsewhere")) == config_digest(_config(1.0))


def test_the_documented_resume_path_is_the_tiny_runs_directory(monkeypatch):
    """README and docs/running.md show the tiny config's run directory; users copy it."""
    import pytest

    from lit_unlearn import cli

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    seen = {}

    def capture(config, ckpt_path):
        seen["name"] = run_name(config)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "fill_run_logger", capture)
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", "configs/debug/tiny.yaml"])
    benchmark, version = seen["name"]
    path = f"runs/{benchmark}/{version}/checkpoints/last.ckpt"
    for doc in ("README.md", os.path.join("docs", "running.md")):
        assert path in open(os.path.join(root, doc)).read(), doc
