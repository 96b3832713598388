#!/usr/bin/env bash
# One short, prepared GPU check, run from the repo root on a machine with CUDA and PyTorch (no install:
# the package is put on PYTHONPATH, so it runs under whatever torch the machine has):
#   1. the gpu-marked tests: CUDA attention paths == reference (values, gradients), train() on CUDA in
#      fp32 == the CPU run, bf16 / fp16 (GradScaler) runs on the flash-LSE path, compiled == eager, one graph;
#   2. the attention benchmark on CUDA, bf16, B=8 H=12 D=64, T = 1024..8192 (time and peak memory vs SDPA),
#      and the later variants (softpick, outgate, sigmoid, kvbias) at T = 1024 and 4096;
#   3. gpt2-small training throughput and MFU, softmax and softmax1, eager and torch.compile, bf16.
# Results land in ${OUT:-gpu_results}/. Budget: about 8 minutes on an H100/H200.
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=$(command -v python3 || command -v python)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
  $py -c "import torch, quietgpt; print('torch', torch.__version__, torch.cuda.get_device_name(), 'quietgpt', quietgpt.__version__)"; } 2>&1 | tee "$out/device.txt"
timeout 300 $py -m pytest -q -rP --show-capture=stdout -p no:cacheprovider tests/test_attention.py tests/test_data.py tests/test_gpu.py \
  tests/test_model.py -m gpu 2>&1 | tee "$out/gpu_tests.log"
timeout 100 $py benchmarks/attention.py --device cuda --B 8 --H 12 --reps 10 --max-reference-T 4096 \
  --variants softmax,softmax1,softmax_n,sink,clipped,gated --json "$out/attention_gpu.json" 2>&1 | tee "$out/attention_gpu.log"
timeout 100 $py benchmarks/attention.py --device cuda --B 8 --H 12 --reps 10 --max-reference-T 1024 --T 1024 --T 4096 \
  --variants softpick,outgate,sigmoid,kvbias --no-kernels --json "$out/attention_gpu_new.json" 2>&1 \
  | tee "$out/attention_gpu_new.log"
timeout 270 $py benchmarks/train_gpu.py --preset gpt2-small --variants softmax,softmax1 --compile both --profile 12 \
  --iters 20 --rounds 3 --json "$out/train_gpu.json" 2>&1 | grep -v Warning | tee "$out/train_gpu.log"
echo "== summary"; grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -3
grep -hE "^T=" "$out/attention_gpu.log" "$out/attention_gpu_new.log" | grep -v reference; grep -E "ms/iter" "$out/train_gpu.log"
