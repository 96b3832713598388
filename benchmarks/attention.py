"""Attention benchmark: fwd+bwd time and memory of every variant's fast and reference paths next to
PyTorch's fused SDPA softmax, as ratios measured in the same run (interleaved repetitions, median).

    python benchmarks/attention.py --json out/attention.json            # CPU: T = 256, 1024, 2048
    python benchmarks/attention.py --device cuda --json out/attn_gpu.json  # GPU: T = 1024 .. 8192

Memory is reported two ways: `saved_mb`, the bytes autograd keeps for the backward pass (exact and
deterministic: O(T) for a fused path, O(T^2) when the T x T probabilities are kept), and, on CUDA,
`peak_mb`, the allocator's peak during fwd+bwd; on CPU `peak_mb` is the peak resident-set growth of a
fresh subprocess running one fwd+bwd (with --no-rss to skip it).
With --prefix the LSE variants also get a row on their exact fallback, SDPA over a prepended null key
(kernels.null_attention's "prefix"), which null_path passes over wherever an LSE kernel runs: the row
says by how much that choice wins at each shape (e.g. --T 64 --B 12 --H 4 --D 32, the CPU preset's).
Goal (issue 3/7): softmax1, softmax_n and sink fast paths <= 1.05x SDPA's time at T = 1024 and 2048.
The later variants (softpick, outgate, sigmoid, kvbias) have rows too, with no goal: softpick and sigmoid
have no fused kernel, their fast path is the O(T)-memory chunked pass (quietgpt/chunked.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from quietgpt.nn import kernels as K
from quietgpt.nn import variants as V
from quietgpt.nn.attention import _attention
from quietgpt.nn.diff import diff_lambda
from quietgpt.nn.options import AttentionOptions
from quietgpt.utils.atomic import atomic_write_json

VARIANTS = ("softmax", "softmax1", "softmax_n", "sink", "clipped", "gated", "softpick", "outgate", "sigmoid",
            "kvbias", "diff")


def make_inputs(B, H, T, D, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = [torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]
    extra = {
        "sink_logit": torch.zeros(H, device=device, requires_grad=True),
        "gate": torch.rand(B, H, T, 1, generator=g).to(device, dtype),  # gated: one gate per head
        "gate_elementwise": torch.rand(B, H, T, D, generator=g).to(device, dtype),  # outgate's default mode
        "kv_bias": tuple((torch.randn(H, D, generator=g) * 0.02).to(device).requires_grad_() for _ in range(2)),
        "diff_vectors": [(torch.randn(D // 2, generator=g) * 0.1).to(device).requires_grad_() for _ in range(4)],
    }
    return q, k, v, extra


def _params(extra) -> list:
    return [extra["sink_logit"], *extra["kv_bias"], *extra["diff_vectors"]]


@functools.cache
def options(name: str, path: str, kernel: str) -> AttentionOptions:
    """One row's attention options, built once: constructing them is not part of the timed call."""
    n = 2.0 if name == "softmax_n" else 1.0  # n belongs to softmax_n: other variants must leave it at 1
    return AttentionOptions(variant=name, n=n, path=path, cuda_kernel=kernel or "auto")


def run_once(name, path, q, k, v, extra):
    """One fwd+bwd; returns the path that ran. `path` may name a CUDA kernel after a colon: "fast:cudnn"
    pins SDPA's backend (sdpa rows), "auto:flash" quietgpt's LSE kernel (null-logit variants, through
    AttentionOptions.cuda_kernel)."""
    path, _, kernel = path.partition(":")
    if path == "prefix":  # the null-key SDPA path the LSE variants fall back to, pinned for comparison
        return _run_prefix(name, q, k, v, extra)
    if name == "sdpa":
        backend = {"": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        chosen = f"sdpa-{kernel}" if kernel else "sdpa"
    else:
        gate = {"gated": extra["gate"], "outgate": extra["gate_elementwise"]}.get(name)
        lam = diff_lambda(*extra["diff_vectors"], init=0.2) if name == "diff" else None  # lambda in the graph
        out, chosen = _attention(q, k, v, options(name, path, kernel),
                                 sink_logit=extra["sink_logit"] if name == "sink" else None, gate=gate,
                                 kv_bias=extra["kv_bias"] if name == "kvbias" else None, diff_lambda=lam)
    out.backward(torch.ones_like(out))
    return chosen


def _run_prefix(name, q, k, v, extra) -> str:
    """One fwd+bwd of an LSE variant on its "prefix" path (SDPA over a prepended null key): the exact
    alternative `null_path` passes over whenever an LSE kernel runs, timed to show why."""
    scale = q.shape[-1] ** -0.5
    if name == "kvbias":
        out = K.kv_bias_attention("prefix", q, k, v, *extra["kv_bias"], True, scale, 0.0)
    else:
        log_n = V.null_log_n(name, options(name, "auto", "").n, extra["sink_logit"])
        out = K.null_attention("prefix", q, k, v, log_n, True, scale, 0.0)
    out.backward(torch.ones_like(out))
    return "prefix"


def saved_bytes(name, path, q, k, v, extra) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_once(name, path, q, k, v, extra)
    return total


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(args_json: str) -> None:
    """Subprocess entry: print the peak resident-set growth (MB) of one fwd+bwd beyond its inputs.

    Linux only. Writing 5 to /proc/self/clear_refs resets the high-water mark (VmHWM) to the current
    RSS, so imports, warm-up and the inputs themselves are excluded. (getrusage's ru_maxrss would not
    do: it survives fork+exec and starts at the parent's peak.)"""
    a = json.loads(args_json)
    run_once(a["name"], a["path"], *make_inputs(1, 1, 16, a["D"], "cpu", torch.float32))  # warm-up
    q, k, v, extra = make_inputs(a["B"], a["H"], a["T"], a["D"], "cpu", getattr(torch, a["dtype"]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    run_once(a["name"], a["path"], q, k, v, extra)
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def peak_mb(name, path, B, H, T, D, device, dtype, q, k, v, extra):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(name, path, q, k, v, extra)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    payload = json.dumps(dict(name=name, path=path, B=B, H=H, T=T, D=D, dtype=str(dtype).split(".")[-1]))
    out = subprocess.run([sys.executable, __file__, "--rss-child", payload], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def bench(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    seqs = args.T or ([256, 1024, 2048] if device == "cpu" else [1024, 2048, 4096, 8192])
    rows = []
    for T in seqs:
        q, k, v, extra = make_inputs(args.B, args.H, T, args.D, device, dtype)
        cands = [("sdpa", "fast")]
        if device.startswith("cuda") and args.kernels:  # every SDPA backend, and each LSE kernel
            cands += [("sdpa", "fast:flash"), ("sdpa", "fast:cudnn"), ("sdpa", "fast:efficient")]
        for name in args.variants:
            cands.append((name, "auto"))
            if device.startswith("cuda") and args.kernels and name in V.LSE_VARIANTS:
                cands += [(name, "auto:flash"), (name, "auto:cudnn")]
            if args.prefix and name in V.LSE_VARIANTS:
                cands.append((name, "prefix"))
            if T <= args.max_reference_T and name != "clipped":  # clipped's auto path *is* the reference
                cands.append((name, "reference"))
        times = {c: [] for c in cands}
        paths = {}
        for c in cands:  # warm-up, and learn which path each candidate runs
            paths[c] = run_once(*c, q, k, v, extra)
        for _ in range(args.reps):  # interleaved: drift and noise hit every candidate alike
            for c in cands:
                for t in (q, k, v, *_params(extra)):
                    t.grad = None
                sync(device)
                t0 = time.perf_counter()
                run_once(*c, q, k, v, extra)
                sync(device)
                times[c].append(time.perf_counter() - t0)
        base = statistics.median(times[("sdpa", "fast")])
        for c in cands:
            med = statistics.median(times[c])
            row = {"T": T, "variant": c[0], "requested": c[1], "path": paths[c], "time_ms": med * 1e3,
                   "ratio_to_sdpa": med / base,
                   "saved_mb": saved_bytes(*c, q, k, v, extra) / 2**20}
            if args.memory:
                row["peak_mb"] = peak_mb(*c, args.B, args.H, T, args.D, device, dtype, q, k, v, extra)
            rows.append(row)
            print(f"T={T:5d} {c[0]:>9s} {paths[c]:>15s} {c[1]:>11s}  {med * 1e3:9.1f} ms  x{med / base:5.2f}  "
                  f"saved {row['saved_mb']:8.1f} MB" + (f"  peak {row['peak_mb']:8.1f} MB" if args.memory else ""),
                  flush=True)
    goals = {}
    for T in (1024, 2048):
        for name in ("softmax1", "softmax_n", "sink"):
            r = [x for x in rows if x["T"] == T and x["variant"] == name and x["requested"] == "auto"]
            if r:
                goals[f"{name}_T{T}_le_1.05x"] = {"ratio": r[0]["ratio_to_sdpa"], "met": r[0]["ratio_to_sdpa"] <= 1.05}
        r = [x for x in rows if x["T"] == T and x["variant"] == "diff" and x["requested"] == "auto"]
        if r:  # two maps: issue 26's goal is 2.2x one SDPA
            goals[f"diff_T{T}_le_2.2x"] = {"ratio": r[0]["ratio_to_sdpa"], "met": r[0]["ratio_to_sdpa"] <= 2.2}
    return {
        "benchmark": "attention",
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": {"B": args.B, "H": args.H, "D": args.D, "dtype": args.dtype, "reps": args.reps,
                   "causal": True, "pass": "fwd+bwd"},
        "results": rows, "goals": goals,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write results here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--T", type=int, action="append", help="sequence length (repeatable)")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=6)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--max-reference-T", type=int, default=2048, help="skip reference paths above this T")
    p.add_argument("--no-kernels", dest="kernels", action="store_false",
                   help="CUDA: skip the rows that pin each SDPA backend and each LSE kernel")
    p.add_argument("--no-rss", dest="memory", action="store_false", help="skip the per-candidate peak memory")
    p.add_argument("--prefix", action="store_true",
                   help="also time the LSE variants' exact fallback, SDPA over a prepended null key")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    args.variants = [v for v in args.variants.split(",") if v]
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    result = bench(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
