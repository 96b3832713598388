"""Training throughput: tokens/s per attention variant, interleaved, and optionally nanoGPT's own train.py.

    python benchmarks/train_throughput.py --json out/train.json --shakespeare tinyshakespeare.txt
    python benchmarks/train_throughput.py --json out/train.json --shakespeare FILE --nanogpt ~/nanoGPT

For each preset (`default` and, given a text file, `shakespeare-char-cpu`) it trains every variant for
--iters iterations, --rounds times in the order A B C ... A B C (so slow drifts in machine load hit every
variant alike) and reports the median tokens/s of the training steps and its ratio to softmax's.
With --nanogpt (a checkout of karpathy/nanoGPT, used only here, never imported by quietgpt) it also runs
nanoGPT's train.py with its README's CPU command for the same number of iterations, interleaved with
quietgpt's softmax run of the same config, and compares the throughput of the training steps (nanoGPT's
per-iteration times after iteration 0, which holds its start-up and first eval; quietgpt's tokens_per_s).
Goals (issue 7): softmax1 >= 0.97x softmax; quietgpt >= 1.2x nanoGPT on shakespeare-char-cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from quietgpt.config import load_config
from quietgpt.training.loop import train
from quietgpt.utils.atomic import atomic_write_json

VARIANTS = ("softmax", "softmax1", "softmax_n", "sink", "clipped", "gated")
NANOGPT_CPU = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--lr_decay_iters=2000",
               "--dropout=0.0"]


def one_run(preset: str, data: str | None, variant: str, iters: int, out: Path, threads: int, cache: str,
            eval_interval: int | None = None, compile: bool = False, dtype: str = "float32") -> dict:
    """Train once; the summary plus `steady_tokens_per_s`, the training steps after iteration 0 (which
    holds any compilation), from the metrics rows (evals excluded)."""
    over = {"model.attention": variant, "train.out_dir": str(out), "train.max_iters": iters,
            "train.threads": threads, "train.device": "cpu", "train.log_interval": max(1, iters // 4),
            "train.compile": compile, "train.dtype": dtype}
    if eval_interval is not None:
        over["train.eval_interval"] = eval_interval
    if data:
        over["data.source"] = data
    if cache:
        over["data.cache_dir"] = cache
    shutil.rmtree(out, ignore_errors=True)
    summary = train(load_config(preset, over), progress=False)
    tokens = seconds = 0.0
    per_iter = summary["tokens"] / iters
    last = 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "tokens_per_s" in row:
            n = (row["iter"] - last) * per_iter  # the row covers iterations last+1 .. iter
            if row["iter"] > 0:
                tokens, seconds = tokens + n, seconds + n / row["tokens_per_s"]
            last = row["iter"]
    summary["steady_tokens_per_s"] = tokens / seconds if seconds else None
    shutil.rmtree(out, ignore_errors=True)
    return summary


def nanogpt_run(root: Path, data: str, iters: int, threads: int) -> float:
    """tokens/s of nanoGPT's train.py (its README's CPU command), from its per-iteration times."""
    prep = root / "data" / "shakespeare_char"
    if not (prep / "train.bin").is_file():
        shutil.copy(data, prep / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=prep, check=True, capture_output=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else dict(os.environ)
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU,
                            f"--max_iters={iters}", f"--out_dir={out}"], cwd=root, env=env, check=True,
                           capture_output=True, text=True)
    # iteration 0 carries start-up work and the first eval; with --iters < 250 no later one has an eval
    times = [float(t) for it, t in re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", r.stdout, re.M)
             if int(it) > 0]
    return 12 * 64 * len(times) / (sum(times) / 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--shakespeare", help="tiny Shakespeare text (enables the shakespeare-char-cpu rows)")
    ap.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout to compare against")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--compile", action="store_true", help="also time quietgpt with train.compile=true "
                    "in the nanoGPT comparison")
    ap.add_argument("--compile-dtype", default="float32", help="train.dtype of that compiled run (float32 or "
                    "bfloat16 autocast)")
    ap.add_argument("--presets", default="default,shakespeare-char-cpu",
                    help="presets for the per-variant table ('' for none: only the nanoGPT comparison)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    wanted = [p for p in args.presets.split(",") if p]
    presets = [(p, None) for p in wanted if p == "default"]
    presets += [(p, args.shakespeare) for p in wanted if p == "shakespeare-char-cpu" and args.shakespeare]
    work = Path(tempfile.mkdtemp(prefix="quietgpt-throughput-"))
    rows, result = [], {"benchmark": "train_throughput", "iters": args.iters, "rounds": args.rounds,
                        "threads": args.threads, "machine": {"platform": platform.platform(),
                                                             "cpus": os.cpu_count()}}
    try:
        for preset, data in presets:
            toks: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v in variants:
                    s = one_run(preset, data, v, args.iters, work / "run", args.threads, args.cache_dir)
                    toks[v].append(s["tokens_per_s"])
            base = statistics.median(toks["softmax"]) if "softmax" in toks else None
            for v in variants:
                med = statistics.median(toks[v])
                rows.append({"preset": preset, "variant": v, "tokens_per_s": med,
                             "ratio_to_softmax": med / base if base else None, "all": toks[v]})
                print(f"{preset:>22s} {v:>9s} {med:9.0f} tok/s  x{med / base if base else float('nan'):.3f}",
                      flush=True)
        result["results"] = rows
        if args.nanogpt and args.shakespeare:
            # nanoGPT, quietgpt eager and (with --compile) quietgpt compiled, interleaved; training steps
            # after iteration 0 on both sides (nanoGPT's own per-iteration times; quietgpt's metrics rows)
            ours, theirs, compiled = [], [], []
            for _ in range(args.rounds):
                theirs.append(nanogpt_run(Path(args.nanogpt), args.shakespeare, args.iters, args.threads))
                s = one_run("shakespeare-char-cpu", args.shakespeare, "softmax", args.iters, work / "run",
                            args.threads, args.cache_dir, eval_interval=250)
                ours.append(s["steady_tokens_per_s"])
                if args.compile:
                    s = one_run("shakespeare-char-cpu", args.shakespeare, "softmax", args.iters, work / "run",
                                args.threads, args.cache_dir, eval_interval=250, compile=True,
                                dtype=args.compile_dtype)
                    compiled.append(s["steady_tokens_per_s"])
            med = statistics.median
            result["nanogpt"] = {"nanogpt_tokens_per_s": med(theirs), "all_nanogpt": theirs,
                                 "quietgpt_tokens_per_s": med(ours), "all_quietgpt": ours,
                                 "ratio": med(ours) / med(theirs)}
            print(f"nanoGPT train.py {med(theirs):9.0f} tok/s; quietgpt {med(ours):9.0f} tok/s "
                  f"(x{result['nanogpt']['ratio']:.2f}), training steps after iteration 0", flush=True)
            if compiled:
                result["nanogpt"].update(quietgpt_compiled_tokens_per_s=med(compiled), all_compiled=compiled,
                                         compiled_dtype=args.compile_dtype,
                                         ratio_compiled=med(compiled) / med(theirs))
                print(f"quietgpt compiled ({args.compile_dtype}) {med(compiled):9.0f} tok/s "
                      f"(x{med(compiled) / med(theirs):.2f})", flush=True)
        soft1 = [r for r in rows if r["variant"] == "softmax1"]
        result["goals"] = {f"softmax1_ge_0.97x_{r['preset']}": r["ratio_to_softmax"] >= 0.97 for r in soft1}
        if "nanogpt" in result:
            best = max(result["nanogpt"]["ratio"], result["nanogpt"].get("ratio_compiled", 0.0))
            result["goals"]["quietgpt_ge_1.2x_nanogpt"] = best >= 1.2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
