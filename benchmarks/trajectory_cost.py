"""What do outlier trajectories (train.outlier_interval) cost, relative to training?

Trains one run of a study preset's run config (default: the default study's, variant softmax1, seed 0; or
a training preset's with --preset) with and without trajectories, alternating the order each round in one
process (the machine may be shared: both arms see the same load), and reports, per arm, the median over
rounds of:

  wall_s          the run's wall time (training, evals, checkpoints and, in the "on" arm, the trajectory)
  train_s         seconds in training steps alone (tokens / tokens_per_s of train()'s summary)
  outlier_s       seconds measuring trajectory points (the "outlier_s" of metrics.jsonl's rows)

and the two ratios the budget (<= 10% of training time) is judged by:

  ratio           outlier_s / train_s of the "on" runs: the measurement's own cost (least noisy)
  ratio_wall      (wall_on - wall_off) / train_s_off: everything the trajectory adds to the run

    python benchmarks/trajectory_cost.py --json trajectory_cost.json [--study default | --preset default]
        [--rounds 2] [--threads 1] [--max-iters N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quietgpt.config import apply_overrides, load_config
from quietgpt.study.spec import resolve_spec
from quietgpt.training.loop import train
from quietgpt.utils.atomic import atomic_write_json


def one_run(cfg, out: Path) -> dict:
    """Train cfg into `out` and return its timings."""
    s = train(apply_overrides(cfg, {"train.out_dir": str(out)}), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    points = [r for r in rows if "outliers" in r]
    return {"wall_s": s["wall_s"], "train_s": s["tokens"] / s["tokens_per_s"],
            "outlier_s": sum(r["outlier_s"] for r in points), "points": len(points),
            "quant_points": sum(any(k.startswith("ppl_ratio_") for k in r["outliers"]) for r in points)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--study", default="default", help="study preset whose run config is timed")
    ap.add_argument("--preset", help="time this training preset's run config instead of a study's")
    ap.add_argument("--variant", default="softmax1")
    ap.add_argument("--max-iters", type=int, help="shorten the run (the trajectory interval is kept)")
    ap.add_argument("--interval", type=int, help="train.outlier_interval of the 'on' arm (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other run config overrides")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.preset:
        cfg = load_config(args.preset, {"model.attention": args.variant, "train.seed": 0})
    else:
        cfg = resolve_spec(args.study).run_config(args.variant, 0, "x")
    over = dict(s.split("=", 1) for s in args.set)
    if args.max_iters:
        over["train.max_iters"] = args.max_iters
    if args.threads:
        over["train.threads"] = args.threads
    cfg = apply_overrides(cfg, over)
    interval = args.interval if args.interval is not None else cfg.train.outlier_interval
    if interval < 1:
        ap.error(f"the preset's train.outlier_interval is {interval}: pass --interval N")
    arms = {"off": apply_overrides(cfg, {"train.outlier_interval": 0}),
            "on": apply_overrides(cfg, {"train.outlier_interval": interval})}
    timings: dict[str, list[dict]] = {"off": [], "on": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in (("off", "on") if r % 2 == 0 else ("on", "off")):
                timings[arm].append(one_run(arms[arm], Path(tmp) / f"{arm}{r}"))
                print(f"round {r} {arm}: {json.dumps(timings[arm][-1])}", flush=True)

    def med(arm: str, key: str) -> float:
        return statistics.median(t[key] for t in timings[arm])

    t = cfg.train
    res = {
        "study": None if args.preset else args.study, "preset": args.preset, "variant": args.variant,
        "max_iters": t.max_iters, "outlier_interval": interval,
        "outlier_quant_every": t.outlier_quant_every, "outlier_sequences": t.outlier_sequences,
        "outlier_quant": t.outlier_quant, "outlier_calib_batches": t.outlier_calib_batches, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg(), "bench_s": time.perf_counter() - t0,
        "off": {k: med("off", k) for k in ("wall_s", "train_s")},
        "on": {k: med("on", k) for k in ("wall_s", "train_s", "outlier_s", "points", "quant_points")},
        "runs": timings,
    }
    res["ratio"] = res["on"]["outlier_s"] / res["on"]["train_s"]
    res["ratio_wall"] = (res["on"]["wall_s"] - res["off"]["wall_s"]) / res["off"]["train_s"]
    res["budget"] = 0.10
    print(json.dumps({k: res[k] for k in ("max_iters", "outlier_interval", "off", "on", "ratio", "ratio_wall")}))
    if args.json:
        atomic_write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
