"""Paired training steps: each variant's real `train_step` on a preset's model, one step each in turn.

    python benchmarks/train_step.py --json out/train_step.json                 # shakespeare-char-cpu
    python benchmarks/train_step.py --json out/train_step.json --preset default --steps 200
    python benchmarks/train_step.py --json out/recipes.json --variants softmax,softmax+muon,ssnorm,osp,op,diff

A variant may be a study arm: a recipe (config.RECIPES: osp, op, ssnorm) or "variant+optimizer".

One model and optimizer per variant (the same seed), built as `quietgpt train` builds them, on random
token batches of the preset's shape. Every round runs one optimizer step of each variant, the order
reversed every other round (A B C, C B A) so drift and cache effects hit every variant alike, then one
forward under no_grad (what evals and trajectories run). Reported per variant: the median step time, the
median of its paired difference to softmax's step in the same round, and the same for the no_grad
forward. Paired single steps are far less noisy than whole processes (benchmarks/train_process.py, the
goal's own measure), so this is the tool that attributes a whole-process gap to the steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from quietgpt.config import RECIPES, apply_overrides, load_config
from quietgpt.nn.model import GPT
from quietgpt.training.step import NonFiniteGuard, build_step_parts, train_step
from quietgpt.utils.atomic import atomic_write_json

VARIANTS = ("softmax", "softmax1", "softmax_n", "sink")
WARMUP = 20  # default rounds left out of the medians: allocator and caches settle


CHAR_VOCAB = 65  # tiny Shakespeare's characters: what a char preset's model gets from its data


def arm_settings(arm: str) -> dict:
    """A study arm's settings: "variant", a recipe (config.RECIPES), either with "+optimizer"."""
    name, _, optimizer = arm.partition("+")
    settings = {"model.attention": "softmax", **RECIPES[name]} if name in RECIPES else {"model.attention": name}
    return {**settings, "train.optimizer": optimizer} if optimizer else settings


def build(preset: str, variant: str, seed: int):
    """(StepParts, guard, batch shape, vocab) for `variant` (an arm: arm_settings) on `preset`, as `quietgpt
    train` builds them (a char-level preset gets tiny Shakespeare's vocabulary, which its data would set)."""
    cfg = load_config(preset, {**arm_settings(variant), "train.device": "cpu"})
    if cfg.data.tokenizer == "char":
        cfg = apply_overrides(cfg, {"model.vocab_size": CHAR_VOCAB})
    mc = cfg.model
    torch.manual_seed(seed)
    model = GPT(mc)
    device = torch.device("cpu")
    parts = build_step_parts(model, cfg.train, device)
    return parts, NonFiniteGuard(cfg.train, device), (cfg.train.batch_size, mc.block_size), mc.vocab_size


def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    built = {v: build(args.preset, v, args.seed) for v in args.variants}
    (B, T), vocab = built[args.variants[0]][2], built[args.variants[0]][3]
    g = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g))
               for _ in range(8)]
    step_s = {v: [] for v in args.variants}
    fwd_s = {v: [] for v in args.variants}
    for r in range(args.steps):
        x, y = batches[r % len(batches)]
        for v in args.variants if r % 2 == 0 else args.variants[::-1]:
            parts, guard = built[v][:2]
            t0 = time.perf_counter()
            train_step(parts, [(x, y)], it=r, lr=1e-4, guard=guard)
            t1 = time.perf_counter()
            with torch.no_grad():
                parts.model(x, y)
            step_s[v].append(t1 - t0)
            fwd_s[v].append(time.perf_counter() - t1)
    base = args.variants[0]
    rows = []
    for v in args.variants:
        row = {"variant": v, "paths": sorted({p for p in built[v][0].base_model.attention_paths() if p}),
               "all_step_ms": [t * 1e3 for t in step_s[v]], "all_nograd_forward_ms": [t * 1e3 for t in fwd_s[v]]}
        for name, s in (("step", step_s), ("nograd_forward", fwd_s)):
            mine, theirs = s[v][args.warmup:], s[base][args.warmup:]
            row[f"{name}_ms"] = statistics.median(mine) * 1e3
            row[f"{name}_paired_diff_ms"] = statistics.median(a - b for a, b in zip(mine, theirs)) * 1e3
            row[f"{name}_speed_vs_{base}"] = statistics.median(theirs) / statistics.median(mine)
        rows.append(row)
        print(f"{v:>10s} step {row['step_ms']:7.2f} ms ({row['step_paired_diff_ms']:+.2f}, "
              f"x{row[f'step_speed_vs_{base}']:.3f})   no_grad forward {row['nograd_forward_ms']:6.2f} ms "
              f"({row['nograd_forward_paired_diff_ms']:+.2f})   {','.join(row['paths'])}", flush=True)
    return {"benchmark": "train_step", "preset": args.preset, "steps": args.steps, "warmup": args.warmup,
            "batch": [B, T], "vocab_size": vocab, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count()},
            "results": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="write results here")
    p.add_argument("--preset", default="shakespeare-char-cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; the first is the baseline")
    p.add_argument("--steps", type=int, default=400, help="rounds (one step of every variant each)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--warmup", type=int, default=WARMUP, help="first rounds left out of the medians")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if not 0 <= args.warmup < args.steps:
        p.error(f"--steps must exceed --warmup ({args.warmup}) rounds")
    Path(args.json).resolve().parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
