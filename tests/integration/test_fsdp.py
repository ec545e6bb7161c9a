"""The sharded (FSDP2) engine through the real ``lit-unlearn fit``: 2 CPU processes (gloo) with
parameters, gradients and both task buffers sharded equal 1 process at the same global batch for
every rule; a shard-local PCGrad would not; the saved model is an ordinary full checkpoint; resume
equals an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lit_unlearn.benchmarks.synthetic.target import target_dir
from lit_unlearn.cli import main
from tests.engine_helpers import relative_difference
from tests.integration.cli_helpers import (
    ENV,
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
)

FSDP = os.path.join(ROOT, "configs", "trainer", "cpu_fsdp.yaml")
SGD = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.05"]
EXAMPLES = os.path.join(ROOT, "tests", "examples")
RULES = ["WeightedSum", "PCGrad", "PCGradGlobal", "SAGO", "SAGOPreferRetain", "BLUR", "GRU", "UPGrad"]
RULE_ARGS = {  # what is not "--model.synthesizer <name> --model.synthesizer.retain_weight 0.5"
    "GRU": ["--model.synthesizer", "GRU", "--model.synthesizer.ema", "0.5"],  # GRU has no retain weight
    "UPGrad": ["--model.synthesizer", os.path.join(ROOT, "configs", "synthesizer", "upgrad.yaml")]
    + ["--model.synthesizer.retain_weight", "0.5"],  # the TorchJD bridge
}


def _initial() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(target_dir("smoke"), "model.safetensors"))


def _fit(
    root, *extra: str, sharded: bool, float64: bool = True, timeout: float = 240, compiled: bool = False
) -> str:
    per_device = "4" if sharded else "8"
    args = [
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "8",
        *SGD,
        "--trainer.default_root_dir",
        str(root),
    ]
    args += ["--data.forget_batch_size", per_device, "--data.retain_batch_size", per_device]
    args += ["--config", FSDP] if sharded else []
    if float64:
        # Sign gating and projections switch at 0: fp32 rounding (one 8-sequence backward vs two
        # 4-sequence ones) flips a few gated coordinates (SAGO: 1.02e-4 of the update measured), which
        # would blur the comparison of the algorithm itself. WeightedSum also runs in fp32, as users do.
        args += ["--model.network.dtype", "float64", "--model.grad_buffer_dtype", "param"]
    if not sharded:  # the 1-process reference runs in this process (the same CLI, minus start-up)
        main([*args, *extra])
    else:
        env = {**ENV, "PYTHONPATH": os.pathsep.join([EXAMPLES, ENV.get("PYTHONPATH", "")])}
        env["LIT_UNLEARN_COMPILE"] = "1" if compiled else "0"
        proc = run("lit-unlearn", *args, *extra, timeout=timeout, env=env)  # the timeout detects deadlocks
        assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(str(root))
    return run_dir


EVALUATED = "UPGrad"  # this rule's runs also evaluate RWKU, membership and lm-eval (data-parallel)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mc_task):
    """Every rule once on 1 process (eager synthesis) and once sharded over 2 with the compiled
    kernels users get by default (the all-reduce runs between the two compiled passes), plus a
    shard-local PCGrad."""
    root = tmp_path_factory.mktemp("fsdp")
    overlay = ["--config", evaluation_overlay(str(root), mc_task[0])]
    out = {}
    for rule in RULES:
        out[rule] = tuple(
            _fit(
                root / f"{rule}-{n}",
                *RULE_ARGS.get(
                    rule, ["--model.synthesizer", rule, "--model.synthesizer.retain_weight", "0.5"]
                ),
                *(overlay if rule == EVALUATED else []),
                sharded=n == 2,
                compiled=n == 2,
            )
            for n in (1, 2)
        )
    out["local"] = _fit(root / "local", "--model.synthesizer", "shard_local.ShardLocalPCGrad", sharded=True)
    out["checkpointed"] = _fit(
        root / "ac",
        *("--model.synthesizer", "SAGO", "--model.synthesizer.retain_weight", "0.5"),
        *("--model.network.activation_checkpointing", "true"),
        sharded=True,
    )
    return out


@pytest.mark.integration
@pytest.mark.parametrize("rule", RULES)
def test_two_sharded_processes_equal_one_process(runs, rule):
    one, two = runs[rule]
    ra, rb = results(one), results(two)
    assert (ra["world_size"], rb["world_size"]) == (1, 2)
    assert ra["synthesis"]["compiled"] is False
    assert rb["synthesis"]["compiled"] is True
    assert ra["effective_batch"] == rb["effective_batch"] == {"forget": 8, "retain": 8}
    difference = relative_difference(saved_weights(two), saved_weights(one), _initial())
    assert difference <= 1e-4, difference
    for ha, hb in zip(ra["history"], rb["history"]):
        for key in ha:
            assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-6), key
    # the geometry diagnostics use whole-tensor (all-reduced) sums too, per layer as well
    assert rb["geometry"]["mean_update_retain_cosine"] == pytest.approx(
        ra["geometry"]["mean_update_retain_cosine"], abs=1e-4
    )
    assert_same_layer_geometry(ra, rb)
    if rule == EVALUATED:  # every rank evaluated its share of the documents; the sums are the same
        assert_same_evaluations(ra, rb)


@pytest.mark.integration
def test_shard_local_pcgrad_departs_from_the_one_process_result(runs):
    one, two = runs["PCGrad"]
    ours = relative_difference(saved_weights(two), saved_weights(one), _initial())
    local = relative_difference(saved_weights(runs["local"]), saved_weights(one), _initial())
    assert ours <= 1e-4 < local, (ours, local)


@pytest.mark.integration
def test_activation_checkpointing_under_fsdp_gives_the_same_update(runs):
    one, _ = runs["SAGO"]
    difference = relative_difference(saved_weights(runs["checkpointed"]), saved_weights(one), _initial())
    assert difference <= 1e-10, difference


@pytest.mark.integration
def test_sharded_save_is_an_ordinary_checkpoint_with_the_same_logits(runs):
    from transformers import AutoModelForCausalLM

    one, two = runs["SAGO"]
    config = json.load(open(os.path.join(two, "unlearned_model", "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"]
    a = AutoModelForCausalLM.from_pretrained(os.path.join(one, "unlearned_model")).eval()
    b = AutoModelForCausalLM.from_pretrained(os.path.join(two, "unlearned_model")).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4)
    assert os.path.isdir(
        os.path.join(two, "checkpoints", "last.ckpt")
    )  # distributed checkpoint: one shard per rank


@pytest.mark.integration
def test_sharded_run_stopped_by_sigterm_resumes_to_the_uninterrupted_result(tmp_path, runs):
    """SIGTERM mid-run: the ranks agree on the stop, write a distributed last.ckpt (one shard per
    rank) and exit 143; --ckpt_path continues to the same weights as the uninterrupted run."""
    _, full = runs["SAGO"]
    root = tmp_path / "cut"
    args = ["fit", "--config", TINY, *SGD, "--config", FSDP, "--trainer.default_root_dir", str(root)]
    args += ["--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "1"]
    args += ["--model.synthesizer", "SAGO", "--model.synthesizer.retain_weight", "0.5"]
    args += ["--data.forget_batch_size", "4", "--data.retain_batch_size", "4"]
    args += ["--model.network.dtype", "float64", "--model.grad_buffer_dtype", "param"]
    code, err, ckpt = sigterm_after_first_checkpoint(str(root), *args)
    assert code == 143, err[-3000:]
    assert ckpt is not None and os.path.isdir(ckpt)
    resumed = run("lit-unlearn", *args, "--ckpt_path", ckpt, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (cut,) = run_dirs(str(root))  # resumed in place
    assert results(cut)["steps"] == 8
    wa, wb = saved_weights(full), saved_weights(cut)
    assert relative_difference(wb, wa, _initial()) <= 1e-12
    # the sharded checkpoint was swapped in whole, with its file digest, and nothing left beside it
    assert "lit_unlearn_digest.json" in os.listdir(ckpt)
    assert sorted(os.listdir(os.path.dirname(ckpt))) == ["last.ckpt"]
    # one flipped byte in one rank's shard: refused in one line before any process starts
    shard = os.path.join(ckpt, sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp"))[-1])
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(shard, "wb").write(data)
    refused = run("lit-unlearn", *args, "--ckpt_path", ckpt, timeout=240)
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert (
        line.startswith(f"lit-unlearn: error: --ckpt_path {ckpt}: corrupted")
        and os.path.basename(shard) in line
    )


@pytest.mark.integration
def test_bf16_weights_with_an_fp32_forget_buffer_and_clipping_run_sharded(tmp_path):
    """The GPU recipe's numerics on CPU: bf16-true weights (fp32 reduce-scatter), the fp32 forget
    buffer (copy mode), PCGrad with all-reduced dot products and clipping of the synthesized update."""
    from safetensors.torch import load_file

    args = [
        "fit",
        "--config",
        TINY,
        "--config",
        FSDP,
        "--trainer.precision",
        "bf16-true",
        "--model.network.dtype",
        "bfloat16",
    ]
    args += ["--trainer.max_steps", "3", "--model.synthesizer", "PCGrad", "--model.gradient_clip_val", "1.0"]
    proc = run("lit-unlearn", *args, "--trainer.default_root_dir", str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(str(tmp_path))
    report = results(run_dir)
    assert report["steps"] == 3 and report["skipped_steps"] == 0
    weights = load_file(os.path.join(run_dir, "unlearned_model", "model.safetensors"))
    assert all(w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all() for w in weights.values())
    changed = [k for k, w in weights.items() if not torch.equal(w, _initial()[k].to(w.dtype))]
    assert changed  # the update reached the weights


@pytest.mark.integration
def test_sharded_adamw_run_resumes_to_the_uninterrupted_result(tmp_path):
    """The shipped optimizer (AdamW), full fine-tuning and a stateful rule, sharded: the moments and
    GRU's moving average (each rank's shard) come back from
    the distributed checkpoint (torch restores optimizer state only into an optimizer whose
    state it can initialise, so the task buffers must not claim .grad before the restore), and
    the buffers hold the sharded parameters even though the step-0 evaluation left FSDP's root
    unit gathered. Both failures changed the resumed weights by ~lr per step before the fix."""
    args = ["fit", "--config", TINY, "--config", FSDP, "--trainer.max_steps", "8"]
    # GRU: its moving average is sharded like the parameters, each rank's shard in the checkpoint
    args += ["--model.synthesizer", "GRU", "--model.synthesizer.ema", "0.5"]
    args += ["--model.optimizer.init_args.lr", "0.002"]  # GRU only ascends: a gentler rate
    args += ["--data.forget_batch_size", "4", "--data.retain_batch_size", "4"]
    args += ["--model.network.dtype", "float64", "--model.grad_buffer_dtype", "param"]
    args += ["--checkpoint.every_n_train_steps", "2"]
    full = run("lit-unlearn", *args, "--trainer.default_root_dir", str(tmp_path / "full"), timeout=240)
    assert full.returncode == 0, full.stderr[-3000:]
    root = tmp_path / "cut"
    code, err, ckpt = sigterm_after_first_checkpoint(
        str(root), *args, "--trainer.default_root_dir", str(root)
    )
    assert code == 143 and ckpt is not None, err[-3000:]
    resumed = run(
        "lit-unlearn", *args, "--trainer.default_root_dir", str(root), "--ckpt_path", ckpt, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a,), (b,) = run_dirs(str(tmp_path / "full")), run_dirs(str(root))
    assert results(b)["steps"] == 8
    assert relative_difference(saved_weights(b), saved_weights(a), _initial()) <= 1e-12
