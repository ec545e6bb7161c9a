#!/usr/bin/env bash
# The GPU checks of the sharded engine, as one script (about 8 minutes on one GPU):
#   1. the synthesis kernels on CUDA, compiled (Triton, the default) and eager, against the
#      memory-bandwidth floor, with the compile time;
#   2. bench_step.py on a ~1 B-parameter random Llama in bf16: one-GPU DDP vs one-GPU FSDP2, with
#      and without activation checkpointing (step time, peak CUDA memory);
#   3. the tiny end-to-end fit with configs/trainer/gpu_fsdp.yaml restricted to one device;
#   4. the same fit with LoRA on a bf16 base (float32 adapters), activation checkpointing, merged save;
#   5. data-parallel evaluation (probes, membership inference, RWKU generation) on 1 and 2
#      processes: on one GPU both share it (correctness, and what sharing costs); with 2+ GPUs each
#      process has its own (expect about 1/2 of the time).
# Results go to bench_results/gpu/ (JSON + the printed tables in gpu_check.log).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
echo "== 1. synthesis kernels"
timeout 200 "$PY" scripts/bench_synthesis.py --device cuda --reps 5 --out "$OUT/synthesis.json"
echo "== 2. one step, ~1 B random Llama, bf16"
timeout 300 "$PY" scripts/bench_step.py --device cuda --precision bf16-true --hidden 2048 --layers 16 \
  --vocab 32000 --seq 512 --batch 4 --steps 6 --warmup 2 --repeats 2 \
  --modes WeightedSum SAGO ac:SAGO fsdp1:WeightedSum fsdp1:SAGO fsdp1+ac:SAGO --out "$OUT/step.json"
echo "== 3. tiny fit, gpu_fsdp.yaml on one device"
timeout 120 .venv/bin/lit-unlearn fit --config configs/debug/tiny.yaml --config configs/trainer/gpu_fsdp.yaml \
  --trainer.devices 1 --trainer.strategy.init_args.data_parallel_size 1 --trainer.precision bf16-true \
  --trainer.default_root_dir "$OUT/tiny_fit"
echo "== 4. tiny fit, LoRA, bf16, activation checkpointing"
timeout 120 .venv/bin/lit-unlearn fit --config configs/debug/tiny.yaml --config configs/adapter/lora.yaml \
  --trainer.accelerator gpu --trainer.precision 32-true --model.network.dtype bfloat16 \
  --model.network.activation_checkpointing true --model.network.adapter.merge_on_save true --model.synthesizer SAGO \
  --model.optimizer.init_args.lr 1e-2 --trainer.default_root_dir "$OUT/tiny_lora"
echo "== 5. data-parallel evaluation, 1 vs 2 processes"
timeout 120 "$PY" scripts/bench_eval.py --device cuda --worlds 1 2 --hidden 1024 --layers 8 --out "$OUT/eval.json"
echo "gpu_check: all done"
