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


def test_trajectory_cost_benchmark_bookkeeping(tmp_path):
    out = tmp_path / "t.json"
    sets = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=16", "train.batch_size=2",
            "train.eval_interval=4", "train.eval_iters=1", "data.synthetic_tokens=20000",
            f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trajectory_cost.py"), "--max-iters", "4", "--interval", "2",
           "--rounds", "1", "--threads", "1", "--json", str(out), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    (on,), (off,) = doc["runs"]["on"], doc["runs"]["off"]
    assert (on["points"], off["points"]) == (3, 0)  # iterations 0, 2, 4
    assert on["quant_points"] == 2  # 0 and 4: the default study's outlier_quant_every = 2
    assert doc["ratio"] == on["outlier_s"] / on["train_s"] and 0 < doc["ratio"]
    assert doc["ratio_wall"] == (on["wall_s"] - off["wall_s"]) / off["train_s"]
