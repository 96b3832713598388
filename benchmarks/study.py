"""Wall time of a whole study (default: the README's main command, `quietgpt study --preset default`).

    python benchmarks/study.py --json study_bench.json [--preset default] [--jobs 1] [--out DIR]

Runs the study from scratch in a fresh folder (a temporary one unless --out is given; an existing --out is
refused so that finished runs are not silently skipped) and writes
{preset, jobs, wall_s, runs, ok, per_run_wall_s, machine, comparisons} to --json.
The issue's target: the default study within 600 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from quietgpt.study import run_study
from quietgpt.utils.atomic import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where to write the timing")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--jobs", type=int, help="runs at a time (default: quietgpt study's, one per CPU core)")
    ap.add_argument("--out", help="study folder to keep (must not exist); default: a temporary folder")
    ap.add_argument("--progress", action="store_true", help="show the progress bars")
    args = ap.parse_args(argv)
    if args.out and Path(args.out).exists():
        print(f"benchmarks/study.py: {args.out} exists; pass a new folder so every run is timed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "study"
        t0 = time.perf_counter()
        results = run_study(out, args.preset, jobs=args.jobs, progress=args.progress)
        wall = time.perf_counter() - t0
    runs = results["runs"]
    doc = {
        "preset": args.preset, "jobs": args.jobs or "auto", "wall_s": wall, "runs": len(runs),
        "ok": sum(r["status"] == "ok" for r in runs),
        "per_run_wall_s": {f"{r['variant']}-s{r['seed']}": r.get("wall_s") for r in runs},
        "machine": results["machine"],
        "comparisons": [{k: c[k] for k in ("metric", "a", "b", "diff_mean", "ci95_low", "ci95_high", "verdict")}
                        for c in results["comparisons"]],
    }
    atomic_write_json(args.json, doc)
    print(json.dumps({k: doc[k] for k in ("preset", "jobs", "wall_s", "runs", "ok")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
