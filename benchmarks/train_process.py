"""Whole-process training throughput: `quietgpt train` as users run it, one process after another.

    python benchmarks/train_process.py --json out/process.json --shakespeare tinyshakespeare.txt
    python benchmarks/train_process.py --json out/process.json --shakespeare FILE --nanogpt ~/nanoGPT

Each case is a fresh `python -m quietgpt train --preset shakespeare-char-cpu` process (start-up, data,
evals, trajectories and checkpoints included), timed by the wall clock around the process, in rounds
A B C, C B A, ... so slow drifts in machine load hit every case alike; the median per case and its ratio
to softmax's are reported, each round's own (paired) ratio too, next to the tokens/s the run's own
summary.json gives (training steps only).
With --nanogpt (a karpathy/nanoGPT checkout, used only here, never imported by quietgpt) nanoGPT's
train.py runs its README's CPU command for the same iterations, interleaved, against quietgpt softmax
with the same work (trajectories off: nanoGPT has none; its checkpoint writes kept on both sides).

Goals (issue 16): softmax1, softmax_n and sink >= 0.97x softmax, and quietgpt softmax >= 1.2x nanoGPT's
train.py, as whole processes on the preset as shipped (2 threads on the 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quietgpt.utils.atomic import atomic_write_json

VARIANTS = ("softmax", "softmax1", "softmax_n", "sink")
GOAL_VARIANT, GOAL_NANOGPT = 0.97, 1.2
NANOGPT_CPU = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]


def quiet_run(variant: str, data: str, iters: int, out: Path, extra: list[str]) -> dict:
    """One `quietgpt train` process: wall seconds around it and its summary's tokens/s."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "quietgpt", "train", "--preset", "shakespeare-char-cpu", "--data", data,
           "--attention", variant, "--out", str(out), *extra]
    if iters:
        cmd += ["--max-iters", str(iters)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "tokens_per_s": summary["tokens_per_s"], "tokens": summary["tokens"]}


def nanogpt_run(root: Path, data: str, iters: int) -> dict:
    """One nanoGPT train.py process (its README's CPU command): wall seconds around it."""
    prep = root / "data" / "shakespeare_char"
    if not (prep / "train.bin").is_file():
        shutil.copy(data, prep / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=prep, check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU,
                        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--out_dir={out}"],
                       cwd=root, check=True, capture_output=True)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": 12 * 64 * iters}


def _row(case: str, runs: list[dict], base: list[dict] | None) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    row = {"case": case, "wall_s": wall, "all_wall_s": [r["wall_s"] for r in runs],
           "process_tokens_per_s": runs[0]["tokens"] / wall}
    if "tokens_per_s" in runs[0]:
        row["summary_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
    if base is not None:
        row["speed_vs_base"] = statistics.median(r["wall_s"] for r in base) / wall
        row["speed_vs_base_by_round"] = [b["wall_s"] / r["wall_s"] for b, r in zip(base, runs)]  # paired
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--shakespeare", required=True, help="tiny Shakespeare text")
    ap.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout to compare against")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--iters", type=int, default=0, help="training iterations (0: the preset's 2000)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {a.rounds}")
    variants = [v for v in a.variants.split(",") if v]
    iters = a.iters or 2000
    work = Path(tempfile.mkdtemp(prefix="quietgpt-process-"))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    plain: list[dict] = []
    theirs: list[dict] = []
    try:
        for i in range(a.rounds):
            for v in variants if i % 2 == 0 else variants[::-1]:  # A B C, C B A: drift within a round cancels
                runs[v].append(quiet_run(v, a.shakespeare, a.iters, work / "run", []))
                print(f"{v:>10s} {runs[v][-1]['wall_s']:7.1f} s", flush=True)
            if a.nanogpt:
                theirs.append(nanogpt_run(Path(a.nanogpt), a.shakespeare, iters))
                plain.append(quiet_run("softmax", a.shakespeare, a.iters, work / "run",
                                       ["--set", "train.outlier_interval=0"]))
                print(f"nanoGPT {theirs[-1]['wall_s']:7.1f} s; quietgpt softmax without trajectories "
                      f"{plain[-1]['wall_s']:7.1f} s", flush=True)
            result = _result(runs, theirs, plain, iters)  # after every round: a stopped run keeps its rounds
            atomic_write_json(a.json, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in result["results"] + ([result["nanogpt"]["quietgpt"]] if theirs else []):
        print(f"{r['case']:>36s} {r['wall_s']:7.1f} s  x{r.get('speed_vs_base', float('nan')):.3f}", flush=True)
    return 0


def _result(runs: dict[str, list[dict]], theirs: list[dict], plain: list[dict], iters: int) -> dict:
    """The JSON document of the rounds so far: per case the median wall time and its speed ratio, the goals."""
    base = runs.get("softmax")
    rows = [_row(v, r, base) for v, r in runs.items()]
    result = {"benchmark": "train_process", "preset": "shakespeare-char-cpu", "iters": iters,
              "rounds": len(next(iter(runs.values()))), "machine": {"platform": platform.platform(),
                                                                    "cpus": os.cpu_count()},
              "results": rows, "goals": {}}
    for r in rows:
        if r["case"] != "softmax" and base is not None:
            result["goals"][f"{r['case']}_ge_{GOAL_VARIANT}x_softmax"] = r["speed_vs_base"] >= GOAL_VARIANT
    if theirs:
        nano, ours = _row("nanoGPT train.py", theirs, None), _row("quietgpt softmax, no trajectories", plain, theirs)
        result["nanogpt"] = {"nanogpt": nano, "quietgpt": ours}
        result["goals"][f"quietgpt_ge_{GOAL_NANOGPT}x_nanogpt"] = ours["speed_vs_base"] >= GOAL_NANOGPT
    return result


if __name__ == "__main__":
    sys.exit(main())
