"""Bad input through the real command line: one line naming the file/flag, a non-zero exit code,
no traceback, nothing written (table-driven; each case is a subprocess)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.integration.cli_helpers import ROOT, TINY, last_checkpoint, run, run_dirs

GOOD = '{"question": "where was velpa ashworth born ?", "answer": "ostrega"}\n'
FILES: dict[str, bytes] = {
    "empty.jsonl": b"",
    "latin1.jsonl": GOOD.encode() + '{"question": "caf\u00e9 ?", "answer": "x"}\n'.encode("latin-1"),
    "malformed.jsonl": (GOOD + '{"question": "q", "answer": \n').encode(),
    "wrong_keys.jsonl": b'{"prompt": "q", "response": "a"}\n',
    "empty_answer.jsonl": (GOOD + '{"question": "q", "answer": "  "}\n').encode(),
    "one.jsonl": GOOD.encode(),
    "empty.yaml": b"",
}
LM_EVAL_OVERLAY = """trainer:
  callbacks:
    - class_path: lit_unlearn.eval.LMEvalCallback
      init_args: {tasks: [wmdp_bioo]}
"""


def forget_file(name: str) -> Callable[[str], list[str]]:
    return lambda d: [
        "--data.forget",
        "lit_unlearn.data.QAPairs",
        "--data.forget.path",
        os.path.join(d, name),
    ]


@dataclass
class Case:
    name: str
    args: Callable[[str], list[str]]  # from the case directory
    expect: Callable[[str], list[str]]  # substrings of the error line
    program: str = "lit-unlearn"
    code: int = 2
    fit: bool = True  # prefix "fit --config tiny.yaml"
    notes: list[str] = field(default_factory=list)


def _path(d: str, name: str) -> list[str]:
    return [os.path.join(d, name)]


CASES = [
    Case(
        "missing file", forget_file("missing.jsonl"), lambda d: [*_path(d, "missing.jsonl"), "file not found"]
    ),
    Case("empty file", forget_file("empty.jsonl"), lambda d: [*_path(d, "empty.jsonl"), "file is empty"]),
    Case(
        "not UTF-8",
        forget_file("latin1.jsonl"),
        lambda d: [os.path.join(d, "latin1.jsonl") + ":2", "not valid UTF-8"],
    ),
    Case(
        "malformed JSON line",
        forget_file("malformed.jsonl"),
        lambda d: [os.path.join(d, "malformed.jsonl") + ":2", "malformed JSON"],
    ),
    Case(
        "wrong keys",
        forget_file("wrong_keys.jsonl"),
        lambda d: [os.path.join(d, "wrong_keys.jsonl") + ":1", "missing field 'question'"],
    ),
    Case(
        "empty answer",
        forget_file("empty_answer.jsonl"),
        lambda d: [os.path.join(d, "empty_answer.jsonl") + ":2", "empty 'answer'"],
    ),
    Case(
        "invalid regex",
        lambda d: ["--model.network.trainable_parameters", "("],
        lambda d: ["--model.network.trainable_parameters", "regular expression"],
    ),
    Case(
        "mistyped local model path",
        lambda d: ["--model.network.path", "runs/unlearned_modl"],
        lambda d: ["--model.network.path", "runs/unlearned_modl", "does not exist"],
    ),
    Case(
        "bare fit: no config, no data",
        lambda d: ["fit"],
        lambda d: ["no data given", "--config configs/debug/tiny.yaml"],
        fit=False,
    ),
    Case(
        "unknown synthesizer",
        lambda d: ["--model.synthesizer", "FooGrad"],
        lambda d: ["--model.synthesizer", "FooGrad", "SAGO", "PCGrad", "WeightedSum"],
    ),
    Case(
        "unknown objective",
        lambda d: ["--model.forget_objective", "NPOO"],
        lambda d: ["--model.forget_objective", "did you mean 'NPO'"],
    ),
    Case(
        "unknown lm-eval task in a config",
        lambda d: ["--config", os.path.join(d, "lm_eval.yaml")],
        lambda d: ["LMEvalCallback tasks", "wmdp_bioo", "did you mean 'wmdp_bio'"],
    ),
    Case(
        "unknown lm-eval task in lit-unlearn-eval",
        lambda d: ["--model", os.path.join(d, "model"), "--tasks", "[wmdp_bioo]"],
        lambda d: ["--tasks", "wmdp_bioo", "did you mean 'wmdp_bio'"],
        program="lit-unlearn-eval",
        fit=False,
    ),
    Case(
        "learning rate <= 0",
        lambda d: ["--model.optimizer.init_args.lr", "0"],
        lambda d: ["--model.optimizer.init_args.lr", "> 0"],
    ),
    Case(
        "precision the CPU would change",
        lambda d: ["--trainer.precision", "16-mixed"],
        lambda d: ["--trainer.precision", "16-mixed"],
    ),
    Case("top-level --optimizer", lambda d: ["--optimizer", "torch.optim.SGD"], lambda d: ["--optimizer"]),
    Case(
        "top-level --lr_scheduler",
        lambda d: ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"],
        lambda d: ["--lr_scheduler"],
    ),
    Case(
        "Trainer flag refused under manual optimization",
        lambda d: ["--trainer.gradient_clip_val", "1.0"],
        lambda d: ["--trainer.gradient_clip_val", "--model.gradient_clip_val"],
    ),
    Case(
        "sequence longer than the model",
        lambda d: ["--data.max_length", "4096"],
        lambda d: ["--data.max_length", "context"],
    ),
    Case(
        "missing config file", lambda d: ["--config", os.path.join(d, "nope.yaml")], lambda d: ["nope.yaml"]
    ),
    Case(
        "max_steps 0",
        lambda d: ["--trainer.max_steps", "0"],
        lambda d: ["--trainer.max_steps 0", "train nothing"],
    ),
    Case(
        "truncated checkpoint",
        lambda d: ["--ckpt_path", os.path.join(d, "truncated.ckpt")],
        lambda d: [os.path.join(d, "truncated.ckpt"), "not a PyTorch checkpoint archive"],
    ),
    Case(
        "corrupted checkpoint (tensor bytes)",
        lambda d: ["--ckpt_path", os.path.join(d, "corrupted.ckpt")],
        lambda d: [os.path.join(d, "corrupted.ckpt"), "corrupted", "do not match the digest"],
    ),
    Case(
        "foreign checkpoint",
        lambda d: ["--ckpt_path", os.path.join(d, "foreign.ckpt")],
        lambda d: [os.path.join(d, "foreign.ckpt"), "not a lit-unlearn training checkpoint"],
    ),
    Case(
        "forget set smaller than one batch",
        forget_file("one.jsonl"),
        lambda d: ["--data.forget_batch_size 8", "one.jsonl", "1 example(s)", "fewer than one global batch"],
    ),
    Case(
        "empty YAML config",
        lambda d: ["--config", os.path.join(d, "empty.yaml")],
        lambda d: [f"--config {os.path.join(d, 'empty.yaml')}", "the file is empty"],
    ),
    Case(
        "empty component file",
        lambda d: ["--model.synthesizer", os.path.join(d, "empty.yaml")],
        lambda d: ["--model.synthesizer", "empty.yaml holds no class", "class_path"],
    ),
    Case(
        "class path to a missing module",
        lambda d: ["--model.synthesizer", "my_rules.Foo"],
        lambda d: ["--model.synthesizer", "'my_rules.Foo'", "No module named 'my_rules'", "SAGO"],
    ),
    Case(
        "run directory as --model",
        lambda d: ["--model.network.path", os.path.join(os.path.dirname(d), "a_run")],
        lambda d: [
            "--model.network.path",
            "is a lit-unlearn run directory",
            os.path.join(os.path.dirname(d), "a_run", "unlearned_model"),
        ],
    ),
    Case(
        "IdkDPO on data without alternates",
        lambda d: [
            *forget_file("one.jsonl")(d),
            "--data.forget_batch_size",
            "1",
            "--model.forget_objective",
            os.path.join(ROOT, "configs", "objective", "forget", "dpo.yaml"),
        ],
        lambda d: ["--model.forget_objective DPO", "one.jsonl", "--data.forget.init_args.alternates_file"],
    ),
    Case(
        "collapsed model (lr = 1e6)",
        lambda d: ["--model.optimizer.init_args.lr", "1e6"],
        lambda d: ["collapsed", "learning rate"],
        code=3,
    ),
]


def _checkpoints(d) -> None:
    """A real last.ckpt (2 steps of the tiny config), then a truncated, a corrupted and a foreign one."""
    import shutil

    import torch

    from tests.test_checkpoint_files import _flip_a_tensor_byte

    proc = run(
        "lit-unlearn",
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "2",
        "--export.enabled",
        "false",
        "--trainer.default_root_dir",
        str(d / "ckpt_run"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    good = last_checkpoint(str(d / "ckpt_run"))
    shutil.copy(good, d / "truncated.ckpt")
    with open(d / "truncated.ckpt", "r+b") as handle:
        handle.truncate(os.path.getsize(good) * 2 // 3)
    shutil.copy(good, d / "corrupted.ckpt")
    _flip_a_tensor_byte(str(d / "corrupted.ckpt"))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, d / "foreign.ckpt")


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("bad")
    d = base / "cases"
    d.mkdir()
    for name, data in FILES.items():
        (d / name).write_bytes(data)
    _checkpoints(d)
    # a finished run's directory, beside the cases (its unlearned_model/ is not one of theirs)
    finished = base / "a_run"
    (finished / "unlearned_model").mkdir(parents=True)
    (finished / "unlearned_model" / "config.json").write_text("{}")
    (finished / "results.json").write_text("{}")
    (d / "lm_eval.yaml").write_text(LM_EVAL_OVERLAY)
    (d / "runs").mkdir()  # the user's runs folder exists; runs/unlearned_modl is a typo of a path in it
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")
    return str(d)


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(case, case_dir):
    root = os.path.join(case_dir, "out-" + case.name.replace(" ", "_").replace("/", "_"))
    args = (["fit", "--config", TINY, "--trainer.default_root_dir", root] if case.fit else []) + case.args(
        case_dir
    )
    start = time.perf_counter()
    proc = run(case.program, *args, timeout=180, cwd=case_dir)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == case.code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines and lines[-1].startswith(f"{case.program}: error: "), proc.stderr[-2000:]
    assert sum(line.startswith(f"{case.program}: error") for line in lines) == 1
    for expected in case.expect(case_dir):
        assert expected in lines[-1], (expected, lines[-1])
    written = [
        os.path.join(d, n) for d, names, _ in os.walk(case_dir) for n in names if n == "unlearned_model"
    ]
    assert not written, written
    print(f"\n{case.name}: {seconds:.1f} s to the error")


@pytest.mark.integration
def test_resuming_with_a_different_global_batch_is_refused(tmp_path):
    first = run(
        "lit-unlearn",
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "5",
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = last_checkpoint(tmp_path)
    proc = run(
        "lit-unlearn",
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "10",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--data.forget_batch_size",
        "4",
        "--ckpt_path",
        ckpt,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("lit-unlearn: error: --ckpt_path")
        and "8+8 sequences per device" in line
        and "4+8" in line
    )
    assert [os.path.exists(os.path.join(d, "unlearned_model")) for d in run_dirs(tmp_path)][1:] in (
        [],
        [False],
    )


def test_cases_cover_the_root_of_the_repository():
    assert os.path.exists(TINY) and os.path.isdir(ROOT)
