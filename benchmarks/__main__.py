"""Run every benchmark and print one table:  python -m benchmarks [--quick] [--out DIR] [--shakespeare FILE]
[--nanogpt DIR]

Each benchmark runs in its own process (as documented in its file) and writes its JSON into --out; this
runner only collects the headline numbers, each next to its goal (issues 3, 7, 16) and whether it is met.
With --shakespeare it adds the whole-process training comparison (train_process.py; with --nanogpt, a
karpathy/nanoGPT checkout, also against nanoGPT's train.py). With CUDA present it adds the attention
benchmark on the GPU and benchmarks/train_gpu.py (gpt2-small tokens/s and MFU). --quick shortens
everything (a smoke run, not for the README).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# The goals each row is judged by (issues 3, 7, 16): time ratios to PyTorch's fused SDPA softmax.
ATTENTION_GOALS = {"softmax1": 1.05, "softmax_n": 1.05, "sink": 1.05, "softpick": 1.3, "outgate": 1.3,
                   "sigmoid": 1.3, "kvbias": 1.3}
GPU_ATTENTION_GOALS = {"softmax1": 1.05, "softmax_n": 1.05, "sink": 1.10}


def _goal(value: float, goal: float | None, op: str) -> str:
    """'<= 1.3: met' / '>= 0.97: missed' for a row with a goal, '' for one without."""
    if goal is None:
        return ""
    met = value <= goal if op == "<=" else value >= goal
    return f"{op} {goal:g}: {'met' if met else 'missed'}"


def run(name: str, args: list[str], out: Path, tag: str | None = None) -> dict | None:
    path = out / f"{tag or name}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(path), *args]
    print(f"$ {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0 or not path.is_file():
        print(f"{name}: failed (exit {r.returncode})", flush=True)
        return None
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shakespeare", help="tiny Shakespeare text for the training benchmarks")
    ap.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout: adds the whole-process nanoGPT comparison")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to skip")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    table: list[tuple[str, str, str, str]] = []  # (benchmark, case, result, goal and whether it is met)
    if "attention" not in skip:
        r = run("attention", ["--reps", "3", "--T", "256", "--T", "1024"] if a.quick else [], out)
        for row in (r or {}).get("results", []):
            if row["requested"] == "auto" and row["T"] >= 1024:
                x = row["ratio_to_sdpa"]
                table.append(("attention", f"{row['variant']} T={row['T']} ({row['path']})",
                              f"{x:.3f}x SDPA time, saved {row['saved_mb']:.0f} MB",
                              _goal(x, ATTENTION_GOALS.get(row["variant"]), "<=")))
    if "train_process" not in skip and a.shakespeare:
        nano = ["--nanogpt", a.nanogpt] if a.nanogpt else []
        r = run("train_process", ["--shakespeare", a.shakespeare, *nano]
                + (["--iters", "30", "--rounds", "1"] if a.quick else []), out)
        for row in (r or {}).get("results", []):
            if row["case"] != "softmax":
                table.append(("training, whole process", f"shakespeare-char-cpu {row['case']}",
                              f"{row['wall_s']:.1f} s ({row['speed_vs_base']:.3f}x softmax's speed)",
                              _goal(row["speed_vs_base"], 0.97, ">=")))
        if r and "nanogpt" in r:
            q = r["nanogpt"]["quietgpt"]
            table.append(("training, whole process", "quietgpt softmax vs nanoGPT train.py",
                          f"{q['wall_s']:.1f} s vs {r['nanogpt']['nanogpt']['wall_s']:.1f} s "
                          f"({q['speed_vs_base']:.3f}x nanoGPT's speed)", _goal(q["speed_vs_base"], 1.2, ">=")))
    if "train_throughput" not in skip:
        extra = ["--shakespeare", a.shakespeare] if a.shakespeare else []
        r = run("train_throughput", (["--iters", "20", "--rounds", "1"] if a.quick else []) + extra, out)
        for row in (r or {}).get("results", []):
            table.append(("training steps", f"{row['preset']} {row['variant']}",
                          f"{row['tokens_per_s']:.0f} tok/s ({row['ratio_to_softmax']:.3f}x softmax)", ""))
    if "train_step" not in skip:
        r = run("train_step", ["--steps", "30"] if a.quick else [], out)
        for row in (r or {}).get("results", []):
            if row["variant"] != "softmax":
                table.append(("training steps, paired", f"{r['preset']} {row['variant']}",
                              f"{row['step_ms']:.1f} ms/step ({row['step_paired_diff_ms']:+.2f} ms, "
                              f"{row['step_speed_vs_softmax']:.3f}x softmax)", ""))
    if _has_cuda() and "attention_gpu" not in skip:
        r = run("attention", ["--device", "cuda", "--B", "8", "--H", "12", "--max-reference-T", "4096"]
                + (["--reps", "3", "--T", "1024"] if a.quick else []), out, tag="attention_gpu")
        for row in (r or {}).get("results", []):
            if row["requested"] == "auto":
                x = row["ratio_to_sdpa"]
                table.append(("attention (GPU)", f"{row['variant']} T={row['T']} ({row['path']})",
                              f"{x:.3f}x SDPA time, peak {row['peak_mb']:.0f} MB",
                              _goal(x, GPU_ATTENTION_GOALS.get(row["variant"]), "<=") if row["T"] >= 1024 else ""))
    if _has_cuda() and "train_gpu" not in skip:
        r = run("train_gpu", ["--iters", "5", "--rounds", "1", "--compile", "off"] if a.quick else [], out)
        for row in (r or {}).get("results", []):
            mfu = f", MFU {row['mfu'] * 100:.1f}%" if row.get("mfu") else ""
            gated = row["compiled"] and row["variant"] == "softmax1"
            goal = _goal(row["ratio_to_softmax"], 0.97, ">=") if gated else ""
            table.append(("training (GPU)", f"gpt2-small {row['variant']}{' compiled' if row['compiled'] else ''}",
                          f"{row['tokens_per_s']:.0f} tok/s ({row['ratio_to_softmax']:.3f}x softmax){mfu}", goal))
    if "measure_cost" not in skip:
        r = run("measure_cost", ["--repeats", "1"] if a.quick else [], out)
        if r and "ratio" in r:
            table.append(("measurement", "full report / plain FP eval", f"{r['ratio']:.2f}x", ""))
    if "trajectory_cost" not in skip:
        quick = ["--max-iters", "50", "--rounds", "1"] if a.quick else []
        r = run("trajectory_cost", ["--threads", "1", *quick], out)
        if r and "ratio" in r:
            table.append(("trajectories", f"default study run, a point every {r['outlier_interval']} iterations",
                          f"{r['ratio'] * 100:.1f}% of training time", _goal(r["ratio"], 0.10, "<=")))
    if "study" not in skip and not a.quick:
        r = run("study", ["--out", str(out / "study")], out)
        if r and "wall_s" in r:
            table.append(("study", "default study wall time", f"{r['wall_s']:.0f} s", _goal(r["wall_s"], 600, "<=")))
    print("\n| benchmark | case | result | goal |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
