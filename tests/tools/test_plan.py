"""The memory planner against PyTorch's own memory tracker, on small random Llamas."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import LlamaConfig, LlamaForCausalLM

from lit_unlearn.adapters import LoRA
from lit_unlearn.engine.buffers import TwoTaskGradients
from lit_unlearn.errors import UserError
from lit_unlearn.models import enable_activation_checkpointing
from lit_unlearn.synthesis import SAGO
from lit_unlearn.tools.plan import format_plan, model_shape, plan, run_settings
from tests.integration.cli_helpers import ENV, ROOT, command

CONFIG = LlamaConfig(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg")
    CONFIG.save_pretrained(path)
    return str(path)


class _NoHook:
    def remove(self) -> None:
        pass


def measured_peak(
    batch: int,
    seq_len: int,
    checkpointing: bool,
    lora_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Peak bytes of two real two-task steps (forget backward, retain backward, SAGO, AdamW)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).to(dtype).train()
    if lora_rank is not None:
        model = LoRA(rank=lora_rank).apply(model)
    if checkpointing:
        enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    rule, ids = SAGO(), torch.randint(0, CONFIG.vocab_size, (batch, seq_len))
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    for p in model.parameters():  # torch's tracker hooks every parameter's gradient, and a frozen
        if not p.requires_grad:  # (LoRA base) weight cannot take a hook: mark those as hooked
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    with tracker:
        grads = TwoTaskGradients(params, torch.float32, 1, 1)
        for _ in range(2):  # the second step has the optimizer state
            for task, sign in (("forget", -1.0), ("retain", 1.0)):
                tracker.reset_mod_stats()
                grads.begin(task)
                (sign * model(input_ids=ids, labels=ids).loss).backward()
                grads.end(task)
            rule(grads.forget_views, grads.retain_views, out=grads.grad_views)
            optimizer.step()
            grads.zero()
    return sum(device["Total"] for device in tracker.get_tracker_snapshot("peak").values())


def test_parameter_count_comes_from_the_configuration_alone(config_dir):
    shape = model_shape(config_dir)
    assert shape.parameters == sum(p.numel() for p in LlamaForCausalLM(CONFIG).parameters())
    assert (shape.layers, shape.hidden, shape.kv_heads) == (2, 128, 2)


@pytest.mark.parametrize(
    "batch, seq_len, checkpointing", [(2, 64, False), (8, 128, False), (16, 256, False), (16, 256, True)]
)
def test_estimate_is_within_15_percent_of_the_measured_peak(config_dir, batch, seq_len, checkpointing):
    estimate = plan(
        model_shape(config_dir), "ddp", 1, "32-true", "float32", batch, seq_len,
        activation_checkpointing=checkpointing, gpu_gib=None,
    )  # fmt: skip
    measured = measured_peak(batch, seq_len, checkpointing)
    assert 0.85 <= estimate.total / measured <= 1.15, (estimate.total, measured)


def test_adapter_count_equals_peft(config_dir):
    shape = model_shape(config_dir)
    for rank, targets in ((8, None), (4, ["q_proj", "v_proj"])):
        model = LoRA(rank=rank, target_modules=targets).apply(LlamaForCausalLM(CONFIG))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert plan(shape, lora_rank=rank, lora_targets=targets, gpu_gib=None).trainable == trainable
    with pytest.raises(UserError, match="--lora_targets"):
        plan(shape, lora_rank=8, lora_targets=["c_attn"])


@pytest.mark.parametrize(
    "batch, seq_len, checkpointing, precision",
    [(8, 128, False, "32-true"), (16, 256, True, "32-true"), (8, 128, False, "bf16-true")],
)
def test_lora_estimate_is_within_15_percent_of_the_measured_peak(
    config_dir, batch, seq_len, checkpointing, precision
):
    """bf16 included: peft keeps the adapters in float32 and casts each adapted layer's input to
    float32, which the activations must count (they exceed full fine-tuning's)."""
    estimate = plan(
        model_shape(config_dir), "ddp", 1, precision, "float32", batch, seq_len,
        activation_checkpointing=checkpointing, gpu_gib=None, lora_rank=8,
    )  # fmt: skip
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    measured = measured_peak(batch, seq_len, checkpointing, lora_rank=8, dtype=dtype)
    assert 0.85 <= estimate.total / measured <= 1.15, (estimate.total, measured)


def test_lora_shrinks_the_trained_state_and_drops_the_reference():
    shape = model_shape(os.path.join(ROOT, "configs", "model", "shapes", "llama-3-8b-instruct"))
    full = plan(shape, "ddp", 1, reference=True, gpu_gib=None)
    lora = plan(shape, "ddp", 1, reference=True, gpu_gib=None, lora_rank=16)
    # q, o: 4096 -> 4096; k, v: 4096 -> 1024; gate, up: 4096 -> 14336; down: 14336 -> 4096; 32 layers
    assert lora.trainable == 16 * 32 * (2 * 8192 + 2 * 5120 + 3 * 18432)
    assert lora.trainable / shape.parameters < 0.01 and lora.reference == 0 < full.reference
    for part in ("gradients", "task_buffers", "optimizer"):
        assert getattr(lora, part) < getattr(full, part) / 50  # float32 adapters vs bf16 weights
    assert (
        plan(shape, "ddp", 1, gpu_gib=80, lora_rank=16).max_batch
        > 0
        == plan(shape, "ddp", 1, gpu_gib=80).max_batch
    )


def test_fsdp_shards_what_it_shards_and_checkpointing_frees_activations(config_dir):
    shape = model_shape(config_dir)
    ddp = plan(shape, "ddp", 8, "bf16-true", gpu_gib=None)
    fsdp = plan(shape, "fsdp", 8, "bf16-true", gpu_gib=None)
    for part in ("weights", "gradients", "task_buffers", "optimizer"):
        assert getattr(fsdp, part) == pytest.approx(getattr(ddp, part) / 8)
    assert fsdp.activations == ddp.activations and fsdp.gathered_layers > 0 == ddp.gathered_layers
    lean = plan(shape, "ddp", 8, "bf16-true", activation_checkpointing=True, gpu_gib=None)
    assert lean.activations < ddp.activations
    with pytest.raises(UserError, match="--precision"):
        plan(shape, precision="16-mixed")


def test_zephyr_on_8_gpus_needs_fsdp():
    """The shipped Zephyr-7B shape: DDP does not fit 80 GB with AdamW and an fp32 buffer, FSDP does."""
    shape = model_shape(os.path.join(ROOT, "configs", "model", "shapes", "zephyr-7b-beta"))
    assert round(shape.parameters / 1e9, 2) == 7.24
    assert plan(shape, "ddp", 8).max_batch == 0
    assert plan(shape, "fsdp", 8).max_batch >= 4


def test_console_script_prints_the_table(tmp_path):
    out = subprocess.run(
        command("lit-unlearn-plan", "--model", os.path.join(ROOT, "configs", "model", "shapes", "llama-3-8b-instruct"),
                "--strategy", "fsdp", "--devices", "8", "--json_out", str(tmp_path / "plan.json")),
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "8.03 B parameters" in out.stdout and "max batch" in out.stdout
    assert "80 GiB GPUs" in out.stdout  # the GPU size it assumed
    assert out.stdout.strip().splitlines()[-1].strip().startswith("fits: 25.65 of 80 GiB per GPU (batch 4)")
    assert (tmp_path / "plan.json").exists()


def test_a_plan_that_does_not_fit_says_so():
    shape = model_shape(os.path.join(ROOT, "configs", "model", "shapes", "zephyr-7b-beta"))
    text = format_plan(plan(shape, "ddp", 8, gpu_gib=80.0), "zephyr", 80.0, 4)
    assert "does not fit: 91.90 GiB per GPU > 80 GiB; the state alone is 80.93 GiB" in text
    small = format_plan(plan(shape, "fsdp", 8, batch=64, gpu_gib=80.0), "zephyr", 80.0, 64)
    assert "does not fit" in small and "at most 24 sequences per device would" in small


def _run_files(*names: str) -> list[str]:
    return [os.path.join(ROOT, "configs", n) for n in names]


def test_a_run_configuration_gives_the_settings_and_the_reference_need():
    npo = run_settings(
        _run_files("benchmark/wmdp_bio.yaml", "experiments/wmdp_bio/npo_sago.yaml", "trainer/gpu_fsdp.yaml")
    )
    assert npo["reference"] is True  # NPO keeps the frozen reference model
    assert (npo["strategy"], npo["devices"], npo["precision"]) == ("fsdp", 8, "bf16-true")
    assert npo["model"] == "HuggingFaceH4/zephyr-7b-beta" and npo["optimizer"] == "adamw"
    graddiff = run_settings(
        _run_files(
            "benchmark/wmdp_bio.yaml", "experiments/wmdp_bio/graddiff_sago.yaml", "trainer/gpu_ddp.yaml"
        )
    )
    assert graddiff["reference"] is False and graddiff["strategy"] == "ddp"
    rmu = run_settings(_run_files("benchmark/wmdp_bio.yaml", "experiments/wmdp_bio/rmu.yaml"))
    assert rmu["reference"] is True


def test_console_script_plans_from_a_run_configuration():
    files = _run_files(
        "benchmark/wmdp_bio.yaml", "experiments/wmdp_bio/npo_sago.yaml", "trainer/gpu_fsdp.yaml"
    )
    args = [a for f in files for a in ("--config", f)]
    args += ["--model", os.path.join(ROOT, "configs", "model", "shapes", "zephyr-7b-beta"), "--gpu_gib", "24"]
    out = subprocess.run(
        command("lit-unlearn-plan", *args), env=ENV, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "· reference model ·" in out.stdout and "fsdp × 8" in out.stdout and "24 GiB GPUs" in out.stdout
    reference = next(line for line in out.stdout.splitlines() if line.strip().startswith("reference"))
    assert float(reference.split()[1]) > 1.0  # counted
    assert "fits:" in out.stdout.splitlines()[-1]


def test_the_readme_memory_table_is_the_tools_output():
    from tests.integration.cli_helpers import load_script

    module = load_script("plan_table")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert module.table() in readme


def test_a_stateful_rule_adds_its_buffer():
    from lit_unlearn.tools.plan import GIB, synthesizer_buffers

    shape = model_shape(os.path.join(ROOT, "configs", "model", "shapes", "zephyr-7b-beta"))
    assert synthesizer_buffers("GRU") == 1 and synthesizer_buffers("lit_unlearn.synthesis.SAGO") == 0
    base, gru = plan(shape, "fsdp", 8), plan(shape, "fsdp", 8, rule_buffers=1)
    # one more fp32 copy of this rank's share of the parameters
    assert (gru.task_buffers - base.task_buffers) == pytest.approx(shape.parameters / 8 * 4)
    assert gru.total / GIB > base.total / GIB
    gru_settings = run_settings(_run_files("debug/tiny.yaml"))
    assert gru_settings["synthesizer"] == "lit_unlearn.synthesis.WeightedSum"
