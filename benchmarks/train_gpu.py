"""GPU training throughput and MFU: a preset's model (gpt2-small by default) per attention variant,
eager and torch.compile, under the autocast dtype train() picks (bf16 on recent GPUs), fused AdamW.

    python benchmarks/train_gpu.py --json out/train_gpu.json
    python benchmarks/train_gpu.py --variants softmax,softmax1,sink --compile off --json out/t.json

The protocol is nanoGPT's bench.py: random tokens (throughput does not depend on the text, and a GPU
machine may have no data or tokenizer files), batch 12 x 1024, one optimizer step per iteration, timed
after warm-up (and after compilation). The step is the one train() runs: quietgpt.training.train_step
with the preset's optimizer settings (gradient accumulation over --grad-accum micro-batches, autocast, a
GradScaler under float16, gradient clipping, the non-finite check: per step on the CPU, flagged on the
device and read after each timed round on a GPU). Configurations are measured in interleaved rounds
(A B C .. A B C) and each reports the median over rounds.

MFU = tokens/s x model.flops_per_token() / peak: nanoGPT's estimate_mfu (6N + 12 L H Q T per token),
against --peak-tflops (default: the dense bf16 datasheet peak of the GPU, 989.5 for H100/H200 SXM,
312 for A100). Extra per-row work of a variant (softmax1's sigmoid) is not counted, so a slower variant
shows a lower MFU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from quietgpt.config import TrainConfig, apply_overrides, load_config
from quietgpt.errors import QuietError
from quietgpt.nn.model import GPT, GPTConfig
from quietgpt.training.step import NonFiniteGuard, build_step_parts, train_step
from quietgpt.utils.atomic import atomic_write_json
from quietgpt.utils.device import allow_tf32, amp_context

PEAKS = {"H100": 989.5, "H200": 989.5, "GH200": 989.5, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(name: str) -> float | None:
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


class Config:
    """One measured configuration: its model, its step parts (optimizer, scaler, autocast, compiled model),
    pre-made batches, and one training step."""

    def __init__(self, mcfg: GPTConfig, variant: str, tc: TrainConfig, device: torch.device, seed: int):
        self.name = f"{variant}{' compiled' if tc.compile else ''}"
        self.variant, self.compiled = variant, tc.compile
        torch.manual_seed(seed)
        cfg = GPTConfig.from_dict({**mcfg.to_dict(), "attention": variant})
        self.model = GPT(cfg).to(device)
        self.tokens_per_iter = tc.batch_size * cfg.block_size * tc.gradient_accumulation_steps
        self.flops_per_token = self.model.flops_per_token()
        self.parts = build_step_parts(self.model, tc, device)
        self.guard = NonFiniteGuard(tc, device)
        self.lr = tc.learning_rate
        g = torch.Generator(device="cpu").manual_seed(seed)
        # a few distinct steps' micro-batches, cycled: no host->device copy inside the timed loop
        xy = [torch.randint(cfg.vocab_size, (tc.batch_size, cfg.block_size + 1), generator=g).to(device)
              for _ in range(4 * tc.gradient_accumulation_steps)]
        pairs = [(t[:, :-1], t[:, 1:]) for t in xy]
        accum = tc.gradient_accumulation_steps
        self.batches = [pairs[i:i + accum] for i in range(0, len(pairs), accum)]
        self.i = 0

    def step(self) -> None:
        train_step(self.parts, self.batches[self.i % len(self.batches)], it=self.i, lr=self.lr, guard=self.guard)
        self.i += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--variants", default="softmax,softmax1")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="both")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--block-size", type=int, default=0, help="override the preset's context (0: keep)")
    ap.add_argument("--vocab-size", type=int, default=50304, help="GPT-2's 50257 padded to a multiple of 64")
    ap.add_argument("--dtype", default="auto", help="train.dtype: auto (bf16 where supported), float32, ...")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="0: from the GPU's name")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", type=int, default=0, help="print the top N ops of 3 profiled steps per config")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA build of torch and a GPU; pass --device cpu to run on the CPU")
    allow_tf32(device)  # as train() does
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or peak_tflops(name)
    over = {"model.vocab_size": args.vocab_size}
    if args.block_size:
        over["model.block_size"] = args.block_size
    over.update({"train.dtype": args.dtype, "train.batch_size": args.batch_size,
                 "train.gradient_accumulation_steps": args.grad_accum})
    run_cfg = apply_overrides(load_config(args.preset), over)
    try:
        amp_dtype, _ = amp_context(args.dtype, device)
    except QuietError as e:
        ap.error(str(e))
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    variants = [v for v in args.variants.split(",") if v]
    result = {"benchmark": "train_gpu", "device": name, "torch": torch.__version__, "preset": args.preset,
              "model": run_cfg.model.to_dict(), "batch_size": args.batch_size, "grad_accum": args.grad_accum,
              "dtype": str(amp_dtype), "iters": args.iters, "rounds": args.rounds, "peak_tflops": peak, "results": []}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    configs = []
    for compiled in modes:
        for v in variants:
            tc = apply_overrides(run_cfg, {"train.compile": compiled}).train
            c = Config(run_cfg.model, v, tc, device, seed=1)
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                held = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                c.step()
            if cuda:
                torch.cuda.synchronize(device)
            c.warmup_s = time.perf_counter() - t0
            # the step's own peak above what was allocated before it (earlier configs' models included)
            c.peak_gb = (torch.cuda.max_memory_allocated(device) - held) / 2**30 if cuda else None
            c.paths = sorted({p for p in c.model.attention_paths() if p})
            print(f"{c.name:>20s}: warm-up {c.warmup_s:6.1f}s, attention path {','.join(c.paths)}", flush=True)
            c.times = []
            configs.append(c)
    for _ in range(args.rounds):
        for c in configs:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.iters):
                    c.step()
                end.record()
                end.synchronize()
                c.times.append(start.elapsed_time(end) / 1e3 / args.iters)
            else:
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    c.step()
                c.times.append((time.perf_counter() - t0) / args.iters)
            c.guard.check_deferred()  # after the timed region: a run that went non-finite measured nothing
    base = {}
    for c in configs:
        s = statistics.median(c.times)
        tok_s = c.tokens_per_iter / s
        row = {"variant": c.variant, "compiled": c.compiled, "attention_paths": c.paths, "ms_per_iter": s * 1e3,
               "tokens_per_s": tok_s, "all_ms": [t * 1e3 for t in c.times], "warmup_s": c.warmup_s,
               "mfu": tok_s * c.flops_per_token / (peak * 1e12) if peak else None,
               "step_peak_memory_gb": c.peak_gb}
        base.setdefault(c.compiled, tok_s if c.variant == "softmax" else None)
        row["ratio_to_softmax"] = tok_s / base[c.compiled] if base.get(c.compiled) else None
        result["results"].append(row)
        mfu = f"{row['mfu'] * 100:5.1f}%" if row["mfu"] is not None else "  n/a"
        ratio = f"x{row['ratio_to_softmax']:.3f}" if row["ratio_to_softmax"] else ""
        print(f"{c.name:>20s}: {s * 1e3:8.2f} ms/iter  {tok_s:10.0f} tok/s  MFU {mfu}  {ratio}", flush=True)
    atomic_write_json(out, result)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for c in configs:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(3):
                    c.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"== profile: {c.name}, 3 steps, top {args.profile} by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
