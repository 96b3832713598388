"""Seeds as one batched ensemble against the process pool.

Part 1, the design choice (--prototype): one training step's forward + backward of S members at the CPU
preset's shape (nanoGPT's CPU model: 4 layers, 128 wide, 4 heads, context 64, batch 12, vocab 65), three ways,
paired in alternating order: a Python loop over S models; torch.func (stack_module_state + vmap +
functional_call, the whole model vmapped); and nn/ensemble.py's explicit member dimension (batched matmuls,
the attention core on the merged batch). softmax and sink (whose exact path is a custom autograd Function).

Part 2, the goal (--study): a study of the outliers-cpu shape (softmax, softmax1, sink x S seeds, the preset's
model and measurement, iterations cut to --iters) run as today's process pool and as ensembles, one after
the other on the same machine; wall times and their ratio.

    python benchmarks/ensemble.py --json OUT --prototype [--members 5]
    python benchmarks/ensemble.py --json OUT --study --data tinyshakespeare.txt --members 5 --iters 300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from quietgpt import GPT, GPTConfig
from quietgpt.nn.ensemble import EnsembleGPT
from quietgpt.utils.atomic import atomic_write_json

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False)
BATCH = 12


def _members(variant: str, S: int) -> list[GPT]:
    out = []
    for s in range(S):
        torch.manual_seed(s)
        out.append(GPT(GPTConfig(**SHAPE, attention=variant)))
    return out


def _data(S: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (S, BATCH, 64), generator=g)
    return x, torch.roll(x, -1, dims=-1)


def prototype(variant: str, S: int, rounds: int) -> dict:
    """Median seconds of one forward + backward of S members, per way, and each way's ratio to the loop."""
    x, y = _data(S)
    loop_models = _members(variant, S)
    ens = EnsembleGPT(_members(variant, S))
    ways = {
        "loop": lambda: [m(x[i], y[i])[1].backward() for i, m in enumerate(loop_models)],
        "member_dim": lambda: ens(x, y)[1].sum().backward(),
    }
    note = None
    try:
        from torch.func import functional_call, stack_module_state, vmap

        base = _members(variant, 1)[0]  # its own weights are never read: functional_call swaps them
        params, buffers = stack_module_state(_members(variant, S))
        for p in params.values():
            p.requires_grad_(True)

        def one(p, b, xi, yi):
            return functional_call(base, (p, b), (xi, yi))[1]

        vm = vmap(one)
        vm(params, buffers, x, y).sum().backward()  # fails here when vmap cannot run this variant
        ways["vmap"] = lambda: vm(params, buffers, x, y).sum().backward()
    except Exception as e:  # record why torch.func cannot run it
        note = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():  # warm-up
        fn()
    for r in range(rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for k in order:
            t = time.perf_counter()
            ways[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"variant": variant, "members": S, "median_s": med,
            "speedup_vs_loop": {k: med["loop"] / v for k, v in med.items()}, "vmap_error": note,
            "threads": torch.get_num_threads()}


MODES = {"pool": {}, "ensemble": {"ensemble": True, "jobs": 1}, "ensemble_2_at_a_time": {"ensemble": True, "jobs": 2}}


def study(data: str, S: int, iters: int, out: Path, modes: tuple[str, ...] = tuple(MODES)) -> dict:
    from quietgpt.study import run_study

    sets = {"train.max_iters": str(iters), "train.lr_decay_iters": str(iters),
            "train.outlier_interval": str(max(1, iters // 4)), "train.eval_interval": str(max(1, iters // 2))}
    rows = {}
    for mode, kw in ((m, MODES[m]) for m in modes):
        t = time.perf_counter()
        res = run_study(out / mode, "outliers-cpu", seeds=S, data=data, overrides=sets, progress=False, **kw)
        rows[mode] = {"wall_s": time.perf_counter() - t, "ok": sum(r["status"] == "ok" for r in res["runs"]),
                      "runs": len(res["runs"]),
                      "val_loss": {f"{r['variant']}-s{r['seed']}": r.get("val_loss") for r in res["runs"]}}
        print(json.dumps({mode: round(rows[mode]["wall_s"], 1)}), flush=True)
    best = min((m for m in rows if m != "pool"), key=lambda k: rows[k]["wall_s"])
    diffs = [abs(rows[best]["val_loss"][k] - v) for k, v in rows["pool"]["val_loss"].items()
             if v is not None and rows[best]["val_loss"].get(k) is not None]
    return {"members": S, "iters": iters, "modes": rows, "best_ensemble_mode": best,
            "speedup": rows["pool"]["wall_s"] / rows[best]["wall_s"], "goal": 1.5,
            "max_val_loss_diff_vs_pool": max(diffs) if diffs else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--prototype", action="store_true")
    ap.add_argument("--study", action="store_true")
    ap.add_argument("--members", type=int, nargs="+", default=[5])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--data", help="tinyshakespeare.txt (the study part)")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--keep", help="keep the study folders here")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"the study part's ways, comma-separated among {', '.join(MODES)} (pool is needed)")
    args = ap.parse_args(argv)
    out: dict = {"benchmark": "ensemble", "torch": torch.__version__}
    if args.prototype:
        out["prototype"] = [prototype(v, S, args.rounds) for S in args.members for v in ("softmax", "sink")]
        for r in out["prototype"]:
            print(json.dumps({k: r[k] for k in ("variant", "members", "speedup_vs_loop", "vmap_error")}), flush=True)
    if args.study:
        if not args.data:
            print("ensemble.py: --study needs --data tinyshakespeare.txt", file=sys.stderr)
            return 2
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        if "pool" not in modes or len(modes) < 2 or any(m not in MODES for m in modes):
            print(f"ensemble.py: --modes needs pool and at least one of {', '.join(list(MODES)[1:])}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.keep) if args.keep else Path(tmp)
            out["study"] = [study(args.data, S, args.iters, root / f"S{S}", modes) for S in args.members]
    atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
