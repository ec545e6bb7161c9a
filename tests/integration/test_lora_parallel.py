"""LoRA through the real ``lit-unlearn fit`` on 2 CPU processes: data-parallel (DDP) and sharded
(FSDP2) runs train the same adapters as 1 process at the same global batch; the saved adapter
holds whole (gathered) tensors and the merged model (``merge_on_save``) agrees too. PCGrad runs
with gradient ascent, SAGO with NPO (whose reference is the same network with its adapters off)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from lit_unlearn.benchmarks.synthetic.target import target_dir
from lit_unlearn.cli import main
from tests.engine_helpers import relative_difference
from tests.integration.cli_helpers import ENV, ROOT, TINY, results, run, run_dirs

LORA = os.path.join(ROOT, "configs", "adapter", "lora.yaml")
FSDP = os.path.join(ROOT, "configs", "trainer", "cpu_fsdp.yaml")
RULES = ["PCGrad", "SAGO"]
LAYOUTS = {
    "one": [],
    "ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
    "fsdp": ["--config", FSDP],
}


def _adapter(run_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "unlearned_model", "adapter_model.safetensors"))


def _merged(run_dir: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "unlearned_model", "merged", "model.safetensors"))


def _fit(root, rule: str, layout: str) -> str:
    per_device = "8" if layout == "one" else "4"
    args = ["fit", "--config", TINY, "--config", LORA, "--trainer.max_steps", "6"]
    args += ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.5"]
    args += ["--model.synthesizer", rule, "--model.synthesizer.retain_weight", "0.5"]
    if rule == "SAGO":  # NPO: its reference is the model with adapters off, sharded once with it
        args += ["--model.forget_objective", os.path.join(ROOT, "configs", "objective", "forget", "npo.yaml")]
    args += ["--data.forget_batch_size", per_device, "--data.retain_batch_size", per_device]
    # float64: sign gating and projections switch at 0, and fp32 rounding between one 8-sequence
    # backward and two 4-sequence ones would flip a few coordinates and blur the comparison.
    args += ["--model.network.dtype", "float64", "--model.grad_buffer_dtype", "param"]
    args += ["--model.network.adapter.merge_on_save", "true"]
    args += ["--trainer.default_root_dir", str(root), *LAYOUTS[layout]]
    if layout == "one":
        main(args)
    else:
        proc = run("lit-unlearn", *args, timeout=240, env=ENV)  # the timeout detects deadlocks
        assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(str(root))
    return run_dir


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        (rule, layout): _fit(root / f"{rule}-{layout}", rule, layout) for rule in RULES for layout in LAYOUTS
    }


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
@pytest.mark.parametrize("rule", RULES)
def test_two_processes_train_the_same_adapters_as_one(lora_runs, rule, layout):
    one, two = _adapter(lora_runs[rule, "one"]), _adapter(lora_runs[rule, layout])
    assert one.keys() == two.keys() and len(one) == 28  # 2 layers x 7 projections x (A, B)
    assert all(one[k].shape == two[k].shape for k in one)  # whole tensors, not shards
    # lora_B starts at zero: its size after training is the update's scale
    update = max(one[k].abs().max().item() for k in one if "lora_B" in k)
    assert update > 1e-3, update
    difference = max((one[k] - two[k]).abs().max().item() for k in one) / update
    # DDP synthesizes over the same whole tensors as 1 process. Sharded, PCGrad's per-tensor dot
    # products (float32 by design) are sums of two shard partials: ~1e-7 rounding per step.
    assert difference <= (1e-5 if layout == "fsdp" and rule == "PCGrad" else 1e-10), difference
    # the merged model (computed from the gathered weights on rank 0 alone) agrees as well
    base = load_file(os.path.join(target_dir("smoke"), "model.safetensors"))
    merged_one, merged_two = _merged(lora_runs[rule, "one"]), _merged(lora_runs[rule, layout])
    assert merged_one.keys() == merged_two.keys() == base.keys()
    tolerance = 1e-5 if layout == "fsdp" and rule == "PCGrad" else 1e-10
    assert relative_difference(merged_two, merged_one, base) <= tolerance
    ra, rb = results(lora_runs[rule, "one"]), results(lora_runs[rule, layout])
    assert rb["world_size"] == 2 and ra["effective_batch"] == rb["effective_batch"]
    for ha, hb in zip(ra["history"], rb["history"]):
        assert hb == pytest.approx(ha, rel=1e-5, abs=1e-7)
    assert rb["geometry"]["mean_update_retain_cosine"] == pytest.approx(
        ra["geometry"]["mean_update_retain_cosine"], abs=1e-6
    )
