"""Every shipped YAML works in its role; every paper overlay holds the official settings.

Component files stand for one argument (``--model.synthesizer FILE``, ``--model.forget_objective
FILE``, ``--model FILE``, ``--data FILE``); benchmark, trainer and debug files are ``--config``
files; experiment files are paper overlays on top of their benchmark.
"""

from __future__ import annotations

import glob
import os
import shlex

import pytest
import yaml

from lit_unlearn.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
ALL = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
EXPERIMENTS = sorted(glob.glob(os.path.join(CONFIGS, "experiments", "*", "*.yaml")))
MINIMAL = ["fit", "--config", "configs/benchmark/synthetic.yaml"]
ROLE_FLAG = {
    "synthesizer": "--model.synthesizer",
    "objective/forget": "--model.forget_objective",
    "objective/retain": "--model.retain_objective",
    "model": "--model",
    "data": "--data",
}


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def role(path: str) -> str:
    folder = os.path.dirname(os.path.relpath(path, CONFIGS))
    return folder if folder in ROLE_FLAG or folder.startswith("experiments") else "config"


def parsed(args: list[str], capsys) -> dict:
    """The resolved configuration (``--print_config``) as a dict."""
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err
    return yaml.safe_load(out)


def test_at_most_a_few_files_per_folder_and_no_generated_grid():
    assert len(EXPERIMENTS) == len(PAPER) <= 36  # one file per paper row, nothing else
    assert not glob.glob(os.path.join(ROOT, "scripts", "make_*config*.py"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_every_file_parses_in_its_role(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = open(path).read()
    assert text.startswith("# Purpose:")  # every shipped YAML says what it is for
    kind = role(path)
    if kind in ROLE_FLAG:
        config = parsed(MINIMAL + [ROLE_FLAG[kind], rel(path)], capsys)
        content = yaml.safe_load(text)
        if "class_path" in content:  # a component stands for the argument's class itself
            expected = content["class_path"]
            section = {"--model.synthesizer": "synthesizer", "--model.forget_objective": "forget_objective"}
            key = section.get(ROLE_FLAG[kind], "retain_objective")
            assert config["model"][key]["class_path"] == expected
        else:  # a group component: its values land in that group
            group = ROLE_FLAG[kind].lstrip("-")
            for key, value in content.items():
                if not isinstance(value, dict):
                    assert config[group][key] == value, key
    elif kind == "config":
        parsed(["fit", "--config", rel(path)], capsys)
    else:
        bench = os.path.basename(os.path.dirname(path))
        parsed(["fit", "--config", f"configs/benchmark/{bench}.yaml", "--config", rel(path)], capsys)


def documented_command(path: str) -> list[str]:
    """The command a file documents in its header comment (after ``lit-unlearn``), with
    continuation lines joined."""
    lines = [line[1:].strip() for line in open(path) if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("lit-unlearn fit"))
    command = ""
    for line in lines[start:]:
        command += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            break
    return shlex.split(command)[1:]


@pytest.mark.parametrize(
    "path",
    EXPERIMENTS + sorted(glob.glob(os.path.join(CONFIGS, "benchmark", "*.yaml"))),
    ids=lambda p: os.path.relpath(p, CONFIGS),
)
def test_documented_command_parses(path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = documented_command(path)
    assert rel(path) in args  # the command names the file itself
    config = parsed(args, capsys)
    assert config["model"]["synthesizer"]["class_path"].startswith("lit_unlearn.synthesis.")


# The official settings of the paper's rows: (benchmark, file) -> lr, steps (None = 2 epochs), beta,
# delta, alpha, gamma, engine (D = DDP with clipping at 1.0, 2 per device x 4 micro-batches;
# Z = ZeRO-3 without clipping, 4 per device x 2 micro-batches). Written out from the authors'
# released configs and launch scripts, independently of the YAML files they check.
PAPER_ROWS = """
wmdp_bio ga 5e-7 100 - - 0 1 Z
wmdp_bio graddiff_naive 3e-6 100 - - 1 1 Z
wmdp_bio graddiff_pcgrad 1e-5 100 - - 1 1 D
wmdp_bio graddiff_pcgrad_global 1e-5 300 - - 1 1 D
wmdp_bio graddiff_sago 1e-5 500 - - 0.5 1 D
wmdp_bio npo_naive 1e-5 100 0.01 - 0.1 1 Z
wmdp_bio npo_pcgrad 1e-5 100 1e-4 - 1 0.1 D
wmdp_bio npo_sago 1e-5 150 1e-4 - 1 0.1 D
wmdp_bio simnpo_naive 1e-5 100 0.7 0.1 0.1 1 Z
wmdp_bio simnpo_pcgrad 1e-5 100 0.02 0.1 0.1 1 D
wmdp_bio simnpo_sago 1e-5 150 0.02 0.1 0.1 1 D
wmdp_bio rmu 5e-5 80 - - 2.5 1 Z
wmdp_cyber ga 5e-7 100 - - 0 1 Z
wmdp_cyber graddiff_naive 5e-6 100 - - 1 1 Z
wmdp_cyber graddiff_pcgrad 1e-5 100 - - 1 1 D
wmdp_cyber graddiff_pcgrad_global 1e-5 100 - - 1 1 D
wmdp_cyber graddiff_sago 1e-5 500 - - 1 1 D
wmdp_cyber npo_naive 1e-5 100 0.01 - 0.1 1 Z
wmdp_cyber npo_pcgrad 1e-5 100 5e-3 - 0.1 1 D
wmdp_cyber npo_sago 1e-5 300 1e-3 - 0.1 1 D
wmdp_cyber simnpo_naive 1e-5 100 0.75 0.1 0.1 1 Z
wmdp_cyber simnpo_pcgrad 1e-5 100 1.0 0.1 0.1 1 D
wmdp_cyber simnpo_sago 1e-5 200 0.1 0.1 0.1 1 D
wmdp_cyber rmu 5e-5 80 - - 1 1 Z
rwku ga 7e-7 - - - 0 1 Z
rwku graddiff_naive 8e-7 - - - 1 1 Z
rwku graddiff_pcgrad 3e-6 - - - 1 1 Z
rwku graddiff_pcgrad_global 4e-6 - - - 1 1 Z
rwku graddiff_sago 1e-5 - - - 1 1 Z
rwku npo_naive 3e-6 - 1e-3 - 1 1 Z
rwku npo_pcgrad 8e-6 - 1e-3 - 1 1 Z
rwku npo_sago 1e-5 - 1e-3 - 1 1 Z
rwku simnpo_naive 8e-6 - 0.5 0.1 1 1 Z
rwku simnpo_pcgrad 8e-6 - 0.5 0.1 0.5 1 Z
rwku simnpo_sago 1e-5 - 0.1 0.1 0.1 1 Z
"""
PAPER = {(f[0], f[1]): f[2:] for f in (line.split() for line in PAPER_ROWS.strip().splitlines())}
FORGET = {
    "ga": "GradientAscent",
    "graddiff": "GradientAscent",
    "npo": "NPO",
    "simnpo": "SimNPO",
    "rmu": "RMU",
}
SYNTH = {"naive": "WeightedSum", "pcgrad": "PCGrad", "pcgrad_global": "PCGradGlobal", "sago": "SAGO"}


def number(text: str) -> float | None:
    return None if text == "-" else float(text)


@pytest.mark.parametrize("key", sorted(PAPER), ids=lambda k: f"{k[0]}/{k[1]}")
def test_paper_overlay_matches_the_official_settings(key, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bench, name = key
    lr, steps, beta, delta, alpha, gamma, engine = PAPER[key]
    path = f"configs/experiments/{bench}/{name}.yaml"
    config = parsed(
        [
            "fit",
            "--config",
            f"configs/benchmark/{bench}.yaml",
            "--config",
            path,
            "--config",
            "configs/trainer/gpu_ddp.yaml",
        ],
        capsys,
    )
    model, data, trainer = config["model"], config["data"], config["trainer"]
    objective, _, rule = name.partition("_")
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["lr"] == pytest.approx(float(lr))
    assert model["optimizer"]["init_args"]["weight_decay"] == 0.0
    if steps == "-":
        assert trainer["max_epochs"] == 2 and trainer["max_steps"] == -1
    else:
        assert trainer["max_steps"] == int(steps)
    forget = model["forget_objective"]
    assert forget["class_path"] == f"lit_unlearn.objectives.{FORGET[objective]}"
    args = forget.get("init_args", {})
    assert (
        args.get("beta") == pytest.approx(number(beta))
        if beta != "-"
        else "beta" not in args or objective == "rmu"
    )
    if delta != "-":
        assert args["delta"] == pytest.approx(float(delta))
    synthesizer = model["synthesizer"]
    assert synthesizer["class_path"] == f"lit_unlearn.synthesis.{SYNTH[rule or 'naive']}"
    assert synthesizer["init_args"]["retain_weight"] == pytest.approx(float(alpha))
    assert synthesizer["init_args"]["forget_weight"] == pytest.approx(float(gamma))
    if objective == "rmu":  # layer 7, c = 2, layers 5-7 down_proj, EmbedDiff retain, constant lr
        assert (args["layer"], args["steering_coeff"]) == (7, 2.0)
        assert model["retain_objective"] == {
            "class_path": "lit_unlearn.objectives.EmbedDiff",
            "init_args": {"layer": 7},
        }
        assert model["network"]["init_args"]["trainable_parameters"] == r"layers\.(5|6|7)\.mlp\.down_proj"
        assert (model["warmup_ratio"], model["lr_decay"]) == (0.0, "constant")
    else:
        assert model["retain_objective"]["class_path"] == "lit_unlearn.objectives.NLL"
        assert (model["warmup_ratio"], model["lr_decay"]) == (0.1, "linear")
    per_device, micro = (2, 4) if engine == "D" else (4, 2)
    assert (data["forget_batch_size"], data["retain_batch_size"]) == (per_device, per_device)
    assert model["accumulate_grad_batches"] == micro
    assert per_device * micro * trainer["devices"] == 32  # the official global batch on 4 GPUs
    assert model["gradient_clip_val"] == (1.0 if engine == "D" else None)
    assert model["network"]["init_args"]["dtype"] == "bfloat16" and trainer["precision"] == "bf16-true"
    assert config["seed_everything"] == 0 and data["max_length"] == 512
    header = open(path).read()
    assert "Official settings" in header and f"lr {lr}" in header


@pytest.mark.parametrize(
    "forget, synthesizer",
    [
        ("ga", s)
        for s in (
            "naive",
            "pcgrad",
            "pcgrad_global",
            "sago",
            "sago_prefer_retain",
            "blur",
            "gru",
            "upgrad",
            "pcd",
        )
    ]
    + [(o, "sago") for o in ("npo", "simnpo", "rmu", "wga", "satimp", "undial", "ceu", "dpo")],
)
def test_components_combine_and_run_two_steps(forget, synthesizer, tmp_path, monkeypatch):
    """Objectives and synthesizers are independent components: any pairing runs (2 steps on the
    smoke target, with the benchmark's callbacks and logger)."""
    monkeypatch.chdir(ROOT)
    args = [
        "fit",
        "--config",
        "configs/debug/tiny.yaml",
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--model.forget_objective",
        f"configs/objective/forget/{forget}.yaml",
        "--model.synthesizer",
        f"configs/synthesizer/{synthesizer}.yaml",
        "--export.enabled",
        "false",
    ]
    if forget == "rmu":  # the 2-layer smoke target: steer layer 1, train its down_proj
        args += [
            "--model.forget_objective.layer",
            "1",
            "--model.retain_objective",
            "configs/objective/retain/embed_diff.yaml",
            "--model.retain_objective.layer",
            "1",
            "--model.network.trainable_parameters",
            r"layers\.1\.mlp\.down_proj",
        ]
    main(args)
    assert glob.glob(os.path.join(tmp_path, "**", "results.json"), recursive=True)


@pytest.mark.parametrize("objective", ["graddiff", "npo", "simnpo"])
@pytest.mark.parametrize("rule", ["naive", "pcgrad", "sago"])
def test_tofu_pairings_compose_open_unlearnings_setting(objective, rule, capsys, monkeypatch):
    """The nine TOFU pairings documented in benchmark/tofu.yaml: components on the benchmark, with
    open-unlearning's lr 1e-5, weight decay 0.01, 10 epochs, global batch 32 + 32 on 4 GPUs, and its
    SimNPO β 4.5 / γ 0.125."""
    monkeypatch.chdir(ROOT)
    args = [
        "fit",
        "--config",
        "configs/benchmark/tofu.yaml",
        "--model.synthesizer",
        f"configs/synthesizer/{rule}.yaml",
    ]
    if objective != "graddiff":
        args += ["--model.forget_objective", f"configs/objective/forget/{objective}.yaml"]
    if objective == "simnpo":
        args += ["--model.forget_objective.beta", "4.5", "--model.synthesizer.forget_weight", "0.125"]
    config = parsed(args + ["--config", "configs/trainer/gpu_ddp.yaml"], capsys)
    model, data, trainer = config["model"], config["data"], config["trainer"]
    assert model["optimizer"]["init_args"] == {
        "lr": 1e-5,
        "weight_decay": 0.01,
        **{k: v for k, v in model["optimizer"]["init_args"].items() if k not in ("lr", "weight_decay")},
    }
    assert trainer["max_epochs"] == 10 and model["warmup_ratio"] == 0.1
    assert data["forget_batch_size"] * trainer["devices"] * model["accumulate_grad_batches"] == 32
    assert data["retain_batch_size"] * trainer["devices"] * model["accumulate_grad_batches"] == 32
    forget = model["forget_objective"]
    expected = {"graddiff": "GradientAscent", "npo": "NPO", "simnpo": "SimNPO"}[objective]
    assert forget["class_path"] == f"lit_unlearn.objectives.{expected}"
    weights = model["synthesizer"]["init_args"]
    assert weights["forget_weight"] == (0.125 if objective == "simnpo" else 1.0)
    assert weights.get("retain_weight", 1.0) == 1.0
    if objective == "simnpo":
        assert forget["init_args"]["beta"] == 4.5
    elif objective == "npo":
        assert forget["init_args"]["beta"] == 0.1


@pytest.mark.parametrize("objective", ["graddiff", "npo", "simnpo"])
@pytest.mark.parametrize("corpus", ["news", "books"])
def test_muse_benchmarks_carry_open_unlearnings_setting(corpus, objective, capsys, monkeypatch):
    """benchmark/muse_<corpus>.yaml on 4 GPUs with SAGO and each objective as documented in its
    header: MUSE's target and retrain models, lr 1e-5 constant without weight decay, 10 epochs,
    global batch 64 + 64 of 2048-token chunks of the forget and retain1 splits, and the MUSE
    evaluation with Min-K%++ PrivLeak."""
    monkeypatch.chdir(ROOT)
    args = ["fit", "--config", f"configs/benchmark/muse_{corpus}.yaml"]
    args += ["--model.synthesizer", "configs/synthesizer/sago.yaml"]
    if objective != "graddiff":
        args += ["--model.forget_objective", f"configs/objective/forget/{objective}.yaml"]
    if objective == "simnpo":
        args += ["--model.forget_objective.beta", "4.5", "--model.synthesizer.forget_weight", "0.125"]
    config = parsed(args + ["--config", "configs/trainer/gpu_ddp.yaml"], capsys)
    expected = {"graddiff": "GradientAscent", "npo": "NPO", "simnpo": "SimNPO"}[objective]
    assert config["model"]["forget_objective"]["class_path"] == f"lit_unlearn.objectives.{expected}"
    assert config["model"]["synthesizer"]["class_path"] == "lit_unlearn.synthesis.SAGO"
    weight = config["model"]["synthesizer"]["init_args"]["forget_weight"]
    assert weight == (0.125 if objective == "simnpo" else 1.0)
    model, data, trainer = config["model"], config["data"], config["trainer"]
    name = {"news": "News", "books": "Books"}[corpus]
    assert model["network"]["init_args"]["path"] == f"muse-bench/MUSE-{name}_target"
    assert (
        model["optimizer"]["init_args"]["lr"] == 1e-5
        and model["optimizer"]["init_args"]["weight_decay"] == 0.0
    )
    assert (model["lr_decay"], model["warmup_ratio"], trainer["max_epochs"]) == ("constant", 0.0, 10)
    for side in ("forget", "retain"):
        assert data[f"{side}_batch_size"] * trainer["devices"] * model["accumulate_grad_batches"] == 64
    assert data["max_length"] == 2048
    assert data["forget"]["init_args"]["path"] == f"data/muse/{corpus}/raw_forget.json"
    assert data["retain"]["init_args"]["path"] == f"data/muse/{corpus}/raw_retain1.json"
    (muse,) = [
        m
        for c in trainer["callbacks"]
        for m in c.get("init_args", {}).get("metrics", [])
        if m["class_path"].endswith("MUSE")
    ]
    assert muse["init_args"]["retain_model"] == f"muse-bench/MUSE-{name}_retrain"
    assert (muse["init_args"]["attack"], muse["init_args"]["k"], muse["init_args"]["max_tokens"]) == (
        "minkpp",
        0.4,
        2048,
    )
    assert muse["init_args"]["directory"] == f"data/muse/{corpus}"
