"""Why Muon was slow on a CPU: one Muon step over the CPU preset's hidden matrices, three ways.

    python benchmarks/muon_step.py --json out/muon_step.json

torch.optim.Muon (Newton-Schulz in bfloat16), quietgpt's Muon with the iteration in float32 one matrix at a
time, and quietgpt's Muon as shipped on a CPU (float32, same-shaped matrices batched), each against one
torch.optim.AdamW step over the same matrices; the model is shakespeare-char-cpu's (4 layers, 128 wide), the
gradients random and fixed. Rounds alternate the order; medians after warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from quietgpt.config import load_config
from quietgpt.nn.model import GPT
from quietgpt.training import optim as O
from quietgpt.utils.atomic import atomic_write_json


class _Unbatched(O.Muon):
    """quietgpt's Muon with every matrix's iteration run alone (the batching taken out)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                u = O.newton_schulz(p.grad.lerp(buf, group["momentum"]), group["ns_coefficients"],
                                    group["ns_steps"], group["eps"], self.ns_dtype)
                p.add_(u, alpha=-group["lr"])


def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("shakespeare-char-cpu", {"model.vocab_size": 65})
    model = GPT(cfg.model)
    params = [p for _, p in O.muon_params(model)]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    kw = dict(lr=0.02, momentum=0.95, nesterov=True, adjust_lr_fn="original")
    opts = {"adamw": torch.optim.AdamW(params, lr=1e-3), "torch_muon_bf16": torch.optim.Muon(params, **kw),
            "muon_fp32_unbatched": _Unbatched(params, ns_dtype=torch.float32, **kw),
            "muon_fp32_batched": O.Muon(params, ns_dtype=torch.float32, **kw)}
    times = {k: [] for k in opts}
    names = list(opts)
    for r in range(args.rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[args.warmup:]) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>20s} {v:8.2f} ms  x{v / med['adamw']:.2f} AdamW", flush=True)
    return {"benchmark": "muon_step", "matrices": len(params), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rounds": args.rounds, "warmup": args.warmup,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "median_ms": med, "vs_adamw": {k: v / med["adamw"] for k, v in med.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    atomic_write_json(args.json, bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
