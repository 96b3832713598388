#!/usr/bin/env bash
# One short, prepared GPU check (run on a machine with CUDA, from the repo root):
#   1. the gpu-marked tests (CUDA fast attention paths == reference, values and gradients);
#   2. the attention benchmark on CUDA, bf16, T = 1024..8192 (time and peak memory vs SDPA);
#   3. training throughput of gpt2-small for softmax and softmax1 (tokens/s and MFU), if train.py has it.
# Results land in ${OUT:-gpu_results}/. Budget: about 6 minutes on an H100.
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
timeout 180 python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log"
timeout 240 python benchmarks/attention.py --device cuda --reps 10 --max-reference-T 4096 \
  --json "$out/attention_gpu.json" 2>&1 | tee "$out/attention_gpu.log"
if [ -f benchmarks/train_throughput.py ]; then
  timeout 240 python benchmarks/train_throughput.py --device cuda --preset gpt2-small --iters 30 \
    --json "$out/train_gpu.json" 2>&1 | tee "$out/train_gpu.log"
fi
