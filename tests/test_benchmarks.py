"""The GPU training benchmark's bookkeeping, run on the CPU at toy size: tokens/s from the timed
iterations, MFU from the model's own FLOPs count, ratios to softmax."""

import json
import subprocess
import sys
from pathlib import Path

from quietgpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


def test_train_gpu_benchmark_on_cpu(tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_gpu.py"), "--device", "cpu", "--preset", "default",
           "--vocab-size", "64", "--block-size", "32", "--batch-size", "2", "--iters", "2", "--warmup", "1",
           "--rounds", "2", "--compile", "off", "--variants", "softmax,softmax1", "--peak-tflops", "1.0",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["results"]}
    assert set(rows) == {"softmax", "softmax1"}
    assert rows["softmax"]["ratio_to_softmax"] == 1.0
    assert rows["softmax1"]["attention_paths"] == ["lse-flash-cpu"]
    model = GPT(GPTConfig.from_dict({**doc["model"], "attention": "softmax"}))
    for r in rows.values():
        assert len(r["all_ms"]) == 2
        assert abs(r["tokens_per_s"] - 2 * 32 / (r["ms_per_iter"] / 1e3)) < 1e-6 * r["tokens_per_s"]
        # MFU = tokens/s x FLOPs per token / peak (1 TFLOP/s here)
        flops = model.flops_per_token()  # softmax1 adds no parameters: the same yardstick
        assert abs(r["mfu"] - r["tokens_per_s"] * flops / 1e12) < 1e-9
    ratio = rows["softmax1"]["tokens_per_s"] / rows["softmax"]["tokens_per_s"]
    assert abs(rows["softmax1"]["ratio_to_softmax"] - ratio) < 1e-9
