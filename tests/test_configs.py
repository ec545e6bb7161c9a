"""Every shipped YAML parses; every objective x synthesizer runs 2 steps on the tiny model."""

from __future__ import annotations

import glob
import os
import shlex
import sys

import pytest

from lit_unlearn.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "configs", "experiments", "*", "*.yaml")))
BLOCKS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    if "/experiments/" not in p
)
MINIMAL = [
    "fit",
    "--config",
    "configs/trainer/cpu.yaml",
    "--config",
    "configs/model/synthetic_target.yaml",
    "--config",
    "configs/data/synthetic.yaml",
]


def documented_command(path: str) -> list[str]:
    """The command an experiment file documents in its header comment (after ``lit-unlearn``)."""
    lines = open(path).read().splitlines()
    cmd = next(line.lstrip("# ").strip() for line in lines if line.lstrip("# ").startswith("lit-unlearn fit"))
    return shlex.split(cmd)[1:]


def parse_only(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err
    return out


def test_experiment_grid_is_complete_and_generated_files_are_current(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_experiment_configs as gen

    files = gen.all_files()
    assert len(files) == len(EXPERIMENTS) == 4 * 5 * 4  # 4 benchmarks x 5 objectives x 4 synthesizers
    for rel, text in files.items():
        with open(os.path.join(ROOT, "configs", "experiments", rel)) as handle:
            assert handle.read() == text, f"{rel} is stale: run scripts/make_experiment_configs.py"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_experiment_parses_with_its_documented_command(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = documented_command(path)
    assert args[-1] == os.path.relpath(path, ROOT)  # the command names the file itself
    out = parse_only(args, capsys)
    assert "synthesizer:" in out and "forget_objective:" in out


@pytest.mark.parametrize("path", BLOCKS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_every_block_parses_on_a_minimal_stack(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert open(path).read().startswith("# Purpose:")  # every shipped YAML says what it is for
    rel = os.path.relpath(path, ROOT)
    if rel.startswith("configs/synthesizer/"):  # component files stand for the synthesizer itself
        out = parse_only(MINIMAL + ["--model.synthesizer", rel], capsys)
        expected = next(line.split(": ", 1)[1] for line in open(path) if line.startswith("class_path:"))
        assert f"class_path: {expected.strip()}" in out
    else:
        parse_only(MINIMAL + ["--config", rel], capsys)


SYNTHETIC = sorted(p for p in EXPERIMENTS if "/synthetic/" in p)


@pytest.mark.parametrize("path", SYNTHETIC, ids=lambda p: os.path.basename(p)[:-5])
def test_objective_synthesizer_combination_runs_two_steps(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = documented_command(path) + [
        "--config",
        "configs/debug/overlay.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    main(args)
    assert os.path.exists(tmp_path / "results.json")
