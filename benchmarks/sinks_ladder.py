"""Where do attention sinks form on a CPU? A ladder of softmax-baseline runs over data, context, weight decay,
learning rate and steps (issue 27), with Gu et al.'s sink rate, the first-token attention mass and Sun et al.'s
massive-activation ratio logged through training.

    python benchmarks/sinks_ladder.py --data tinyshakespeare.txt --out runs/ladder            # every point
    python benchmarks/sinks_ladder.py --data tinyshakespeare.txt --out runs/ladder --points wd1.0 --seeds 3
    python benchmarks/sinks_ladder.py --out runs/ladder --summarise   # ladder.json + ladder.png from what ran

Softmax only: no variant is trained until a regime is chosen. Every point is `quietgpt train` on a preset with
the point's settings, its trajectories (train.outlier_interval) measuring the registry's trajectory metrics
on fixed validation windows (no quantized points: they are not what is looked for here). Points run two at a
time (one thread each) and resume: a finished point is skipped, an interrupted one continues (`--resume`).

Gu et al. (ICLR 2025, "When Attention Sink Emerges", sail-sg/Attention-Sink): ~60M LLaMA-style models on the
Pile, 20k steps of 1M tokens, reach Sink_1^0.3 = 18.2% (weight decay 0.1), 41.1% (0.5), 37.7% (1.0), 15.2% (0);
32.2% at twice the learning rate; with 500M training tokens ~4%, with 50M under 1% (their Table 2, Table 9,
Figure 4). The ladder's runs see 4.6M tokens (6000 steps of 768) and 31M (the long point).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> (training preset, settings, iterations, data): the ladder's axes around one base point, nanoGPT's CPU
# model (4 layers, 4 heads, 128 wide) on character-level Shakespeare, context 64, batch 12, AdamW, lr 1e-3,
# weight decay 0.1 (shakespeare-char-cpu, the outliers-cpu recipe's model)
BASE = "shakespeare-char-cpu"
STEPS = 6000
POINTS: dict[str, tuple[str, dict, int, str]] = {
    "base": (BASE, {}, STEPS, "text"),
    "long": (BASE, {}, 40000, "text"),  # the steps axis: ~35 min of one core (3000 iterations take ~2.5 min)
    "wd0": (BASE, {"train.weight_decay": 0.0}, STEPS, "text"),
    "wd0.5": (BASE, {"train.weight_decay": 0.5}, STEPS, "text"),
    "wd1.0": (BASE, {"train.weight_decay": 1.0}, STEPS, "text"),
    "lr3x": (BASE, {"train.learning_rate": 3e-3, "train.min_lr": 3e-4}, STEPS, "text"),
    "wd0.5-lr3x": (BASE, {"train.weight_decay": 0.5, "train.learning_rate": 3e-3, "train.min_lr": 3e-4}, STEPS,
                   "text"),
    # context 256 at batch 3: the same 768 tokens per step as the base
    "ctx256": (BASE, {"model.block_size": 256, "train.batch_size": 3}, STEPS, "text"),
    # the embedded synthetic task (80% filler: heads often have nothing to read), the default preset's model
    # (context 128) at the base's batch and schedule
    "synthetic": ("default", {"train.batch_size": 12, "train.learning_rate": 1e-3, "train.min_lr": 1e-4,
                              "train.warmup_iters": 100}, STEPS, "synthetic"),
}
TRACKED = ("sink_rate", "first_token_mass_mean", "massive_ratio_max", "act_inf_norm_max", "weight_kurtosis_max")


def run_point(name: str, seed: int, args) -> dict:
    """Train one point (or resume it); returns its summary line."""
    preset, settings, iters, data = POINTS[name]
    iters = max(50, int(iters * args.scale))
    out = Path(args.out) / f"{name}-s{seed}"
    if (out / "summary.json").exists() and json.loads((out / "summary.json").read_text()).get("iters") == iters:
        return {"point": name, "seed": seed, "skipped": True}
    interval = max(10, iters // 24)  # ~24 trajectory points whatever the length
    sets = {"train.max_iters": iters, "train.lr_decay_iters": iters, "train.eval_interval": max(10, iters // 6),
            "train.outlier_interval": interval, "train.outlier_quant_every": 0, "train.outlier_sequences": 16,
            "train.threads": 1, "train.seed": seed, **settings}
    cmd = [sys.executable, "-m", "quietgpt", "train", "--preset", preset, "--out", str(out)]
    if data != "synthetic":
        cmd += ["--data", args.data]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    if (out / "train_state.pt").exists():
        cmd.append("--resume")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = {"point": name, "seed": seed, "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode:
        line["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    print(json.dumps(line), flush=True)
    return line


def trajectory(run: Path) -> dict:
    """{metric: [(iteration, tokens seen, value), ...]} from a run's metrics.jsonl, and its config."""
    cfg = json.loads((run / "config.json").read_text())
    t = cfg["train"]
    per_iter = t["batch_size"] * t["gradient_accumulation_steps"] * cfg["model"]["block_size"]
    out: dict[str, list] = {k: [] for k in TRACKED}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in (row.get("outliers") or {}).items():
            if k in out and isinstance(v, int | float):
                out[k].append((row["iter"], row["iter"] * per_iter, v))
    return {"config": {"block_size": cfg["model"]["block_size"], "batch_size": t["batch_size"],
                       "learning_rate": t["learning_rate"], "weight_decay": t["weight_decay"],
                       "max_iters": t["max_iters"], "data": cfg["data"]["source"]}, "trajectory": out}


def summarise(root: Path) -> dict:
    """ladder.json (every run's trajectories and its largest values) and ladder.png (sink rate and first-token
    mass against tokens seen, one line per run, Gu et al.'s range shaded)."""
    runs = {}
    for run in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").exists() and (p / "config.json").exists()):
        doc = trajectory(run)
        tr = doc["trajectory"]
        doc["largest"] = {k: max((v for _, _, v in tr[k]), default=None) for k in TRACKED}
        doc["final"] = {k: (tr[k][-1][2] if tr[k] else None) for k in TRACKED}
        doc["tokens"] = max((tok for _, tok, _ in tr["sink_rate"]), default=0)
        summary = run / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            doc["val_loss"], doc["wall_s"] = s.get("val_loss"), s.get("wall_s")
        runs[run.name] = doc
    result = {"benchmark": "sinks_ladder", "gu_et_al_sink_rate": {"wd0": 0.152, "wd0.1": 0.1818, "wd0.5": 0.4108,
                                                                  "wd1.0": 0.3771, "lr2x": 0.3223,
                                                                  "data_500M_tokens": 0.04, "data_50M_tokens": 0.01},
              "runs": runs}
    (root / "ladder.json").write_text(json.dumps(result, indent=1))
    _plot(runs, root / "ladder.png")
    for name, d in runs.items():
        lg, final = d["largest"], d["final"]
        print(f"{name:18s} tokens {d['tokens'] / 1e6:6.1f}M  sink rate max {lg['sink_rate'] or 0:.4f}  "
              f"first-token mass max {lg['first_token_mass_mean'] or 0:.4f} "
              f"(final {final['first_token_mass_mean'] or 0:.4f})  massive ratio max {lg['massive_ratio_max'] or 0:.1f}"
              f"  val loss {d.get('val_loss') or float('nan'):.3f}")
    return result


def _plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, d in runs.items():
        for ax, key in zip(axes, ("sink_rate", "first_token_mass_mean", "massive_ratio_max"), strict=True):
            pts = d["trajectory"][key]
            if pts:
                ax.plot([t / 1e6 for _, t, _ in pts], [v for _, _, v in pts], label=name, lw=1.2)
    axes[0].axhspan(0.15, 0.41, color="0.85", label="Gu et al., 60M on 5B tokens")
    for ax, title in zip(axes, ("sink rate (Gu et al.'s Sink_1^0.3)", "first-token attention mass (mean)",
                                "massive activation ratio (layer max)"), strict=True):
        ax.set_xlabel("tokens seen (millions)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the ladder's folder (one run folder per point and seed)")
    p.add_argument("--data", help="tinyshakespeare.txt (every point but synthetic)")
    p.add_argument("--points", default=",".join(POINTS), help=f"comma-separated among {', '.join(POINTS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 per point")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--scale", type=float, default=1.0, help="multiply every point's iterations (a smoke test)")
    p.add_argument("--summarise", action="store_true", help="only write ladder.json and ladder.png")
    args = p.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        names = [n.strip() for n in args.points.split(",") if n.strip()]
        bad = [n for n in names if n not in POINTS]
        if bad or (args.data is None and any(POINTS[n][3] == "text" for n in names)):
            print(f"sinks_ladder: error: unknown point(s) {', '.join(bad)}; choose among {', '.join(POINTS)}" if bad
                  else "sinks_ladder: error: text points need --data tinyshakespeare.txt", file=sys.stderr)
            return 2
        jobs = [(n, s) for n in sorted(names, key=lambda n: -POINTS[n][2]) for s in range(args.seeds)]
        with ThreadPoolExecutor(args.jobs) as pool:  # the longest first, so the two cores finish together
            lines = list(pool.map(lambda j: run_point(*j, args), jobs))
        if any(line.get("rc") for line in lines):
            print("sinks_ladder: some points failed (their lines above say why); rerun to resume them",
                  file=sys.stderr)
    summarise(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
