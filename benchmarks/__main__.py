"""Run every benchmark and print one table:  python -m benchmarks [--quick] [--out DIR] [--shakespeare FILE]

Each benchmark runs in its own process (as documented in its file) and writes its JSON into --out; this
runner only collects the headline numbers. With CUDA present it adds the attention benchmark on the GPU
and benchmarks/train_gpu.py (gpt2-small tokens/s and MFU). --quick shortens everything (a smoke run,
not for the README).
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
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to skip")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(a.skip.split(","))
    table: list[tuple[str, str, str]] = []
    if "attention" not in skip:
        r = run("attention", ["--reps", "3", "--T", "256", "--T", "1024"] if a.quick else [], out)
        for row in (r or {}).get("results", []):
            if row["requested"] == "auto" and row["T"] >= 1024:
                table.append(("attention", f"{row['variant']} T={row['T']} ({row['path']})",
                              f"{row['ratio_to_sdpa']:.3f}x SDPA time, saved {row['saved_mb']:.0f} MB"))
    if "train_throughput" not in skip:
        extra = ["--shakespeare", a.shakespeare] if a.shakespeare else []
        r = run("train_throughput", (["--iters", "20", "--rounds", "1"] if a.quick else []) + extra, out)
        for row in (r or {}).get("results", []):
            table.append(("training", f"{row['preset']} {row['variant']}",
                          f"{row['tokens_per_s']:.0f} tok/s ({row['ratio_to_softmax']:.3f}x softmax)"))
    if _has_cuda() and "attention_gpu" not in skip:
        r = run("attention", ["--device", "cuda", "--B", "8", "--H", "12", "--max-reference-T", "4096"]
                + (["--reps", "3", "--T", "1024"] if a.quick else []), out, tag="attention_gpu")
        for row in (r or {}).get("results", []):
            if row["requested"] == "auto":
                table.append(("attention (GPU)", f"{row['variant']} T={row['T']} ({row['path']})",
                              f"{row['ratio_to_sdpa']:.3f}x SDPA time, peak {row['peak_mb']:.0f} MB"))
    if _has_cuda() and "train_gpu" not in skip:
        r = run("train_gpu", ["--iters", "5", "--rounds", "1", "--compile", "off"] if a.quick else [], out)
        for row in (r or {}).get("results", []):
            mfu = f", MFU {row['mfu'] * 100:.1f}%" if row.get("mfu") else ""
            table.append(("training (GPU)", f"gpt2-small {row['variant']}{' compiled' if row['compiled'] else ''}",
                          f"{row['tokens_per_s']:.0f} tok/s ({row['ratio_to_softmax']:.3f}x softmax){mfu}"))
    if "measure_cost" not in skip:
        r = run("measure_cost", ["--repeats", "1"] if a.quick else [], out)
        if r and "ratio" in r:
            table.append(("measurement", "full report / plain FP eval", f"{r['ratio']:.2f}x"))
    if "trajectory_cost" not in skip:
        quick = ["--max-iters", "50", "--rounds", "1"] if a.quick else []
        r = run("trajectory_cost", ["--threads", "1", *quick], out)
        if r and "ratio" in r:
            table.append(("trajectories", f"default study run, a point every {r['outlier_interval']} iterations",
                          f"{r['ratio'] * 100:.1f}% of training time"))
    if "study" not in skip and not a.quick:
        r = run("study", ["--out", str(out / "study")], out)
        if r and "wall_s" in r:
            table.append(("study", "default study wall time", f"{r['wall_s']:.0f} s"))
    print("\n| benchmark | case | result |\n|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
