"""The CPU's matmul ceiling for a preset's model, and the step-time floor it implies.

    python benchmarks/matmul_peak.py --json out/peak.json                 # shakespeare-char-cpu shapes
    python benchmarks/matmul_peak.py --preset default --batch-size 16 --json out/peak.json

Times fp32 matrix products of the model's own shapes (tokens x C x 3C, x C, x 4C, 4C x C: the forward's
projections; the backward's are the same sizes transposed) at 1 and N threads, and divides the model's
training FLOPs per step (model.flops_per_token() x tokens) by the best rate: no implementation of that
step on this machine can be faster than this floor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from quietgpt.config import apply_overrides, load_config
from quietgpt.nn.model import GPT
from quietgpt.utils.atomic import atomic_write_json


def gflops(M: int, K: int, N: int, reps: int) -> float:
    a, b = torch.randn(M, K), torch.randn(K, N)
    for _ in range(10):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * M * K * N * reps / (time.perf_counter() - t) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--preset", default="shakespeare-char-cpu")
    ap.add_argument("--batch-size", type=int, default=0, help="0: the preset's train.batch_size")
    ap.add_argument("--vocab-size", type=int, default=65)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    cfg = apply_overrides(load_config(args.preset), {"model.vocab_size": args.vocab_size})
    C, tokens = cfg.model.n_embd, (args.batch_size or cfg.train.batch_size) * cfg.model.block_size
    shapes = [(tokens, C, 3 * C), (tokens, C, C), (tokens, C, 4 * C), (tokens, 4 * C, C)]
    threads_max = torch.get_num_threads()
    rows = []
    for threads in sorted({1, threads_max}):
        torch.set_num_threads(threads)
        rates = [gflops(*s, args.reps) for s in shapes]
        rows.append({"threads": threads, "gflops": dict(zip(map(str, shapes), rates)), "median": sorted(rates)[1]})
        print(f"{threads} thread(s): " + ", ".join(f"{s}: {r:.0f}" for s, r in zip(shapes, rates)) + " GFLOP/s")
    torch.set_num_threads(threads_max)
    flops_step = GPT(cfg.model).flops_per_token() * tokens
    peak = max(r["median"] for r in rows)
    floor_ms = flops_step / (peak * 1e9) * 1e3
    print(f"{flops_step / 1e9:.2f} GFLOP per training step; at {peak:.0f} GFLOP/s the floor is {floor_ms:.1f} ms "
          f"= {tokens / floor_ms * 1e3:,.0f} tokens/s")
    doc = {"benchmark": "matmul_peak", "preset": args.preset, "tokens_per_step": tokens, "rows": rows,
           "flops_per_step": flops_step, "peak_gflops": peak, "floor_ms": floor_ms,
           "floor_tokens_per_s": tokens / floor_ms * 1e3, "torch": torch.__version__}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
