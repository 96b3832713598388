"""A study's results: gather every run's row, compute the statistics, write results.json and results.csv.

results.json holds the study config, the machine, the wall time, the metrics' descriptions (from the
registry), every run's row, the summary (mean and 95% CI per metric and variant) and the paired
comparisons against the baseline (stats.py). `quietgpt report DIR` rebuilds it from the run folders.

Trajectories (runs trained with train.outlier_interval > 0): each run's outlier rows in metrics.jsonl become
per-run values auc_<metric> (registry.auc_metrics: the mean level over training), summarised and compared
paired like the final-step metrics, and results.json's "trajectories" says, per variant, when the seed-mean
trajectory first crossed each EMERGENCE threshold (or that it never did within the run).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from quietgpt.errors import QuietError
from quietgpt.measurement.registry import Metric, auc_metrics, number, trajectory_metrics, zero_by_construction
from quietgpt.quant.simulated import group_order
from quietgpt.quant.spec import parse_quant_list
from quietgpt.stats import compare, confirm, fmt, paired, summarize
from quietgpt.study.power import power_table
from quietgpt.study.predictors import PREDICTORS, TRAJECTORY_PREDICTORS, predictor_table, trajectory_table
from quietgpt.study.preregistration import describe
from quietgpt.study.run import failed_row, run_config_record, run_name
from quietgpt.study.spec import StudySpec, same_record
from quietgpt.utils.atomic import atomic_write_json, atomic_write_text


def machine_info(device: str) -> dict:
    import torch

    from quietgpt.utils.version import __version__

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "quietgpt": __version__}


def _read(path: Path) -> dict | None:
    with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def load_spec(study_dir: Path, old: dict) -> StudySpec:
    """The study's spec from study.json, else from an old results.json; a one-line error when neither."""
    doc = _read(study_dir / "study.json") or old.get("config")
    if not doc:
        raise QuietError(f"{study_dir} holds no study (no study.json or results.json); "
                         f"run `quietgpt study --out {study_dir}` first")
    return StudySpec.from_dict(doc)


def _rows(study_dir: Path, spec: StudySpec, extra_rows: dict, old_rows: dict) -> list[dict]:
    """Every (variant, seed)'s row: its result.json if made with this config, else `extra_rows`, else the
    old results.json's, else a failed row saying the run never finished."""
    rows = []
    for v in spec.arms:
        for s in spec.seeds:
            r = _read(study_dir / "runs" / run_name(v, s) / "result.json")
            if r is not None:
                made_with = r.pop("run_config", None)
                if made_with is not None and not same_record(made_with, run_config_record(spec, v, s)):
                    r = failed_row(v, s, r.get("dir") or f"runs/{run_name(v, s)}", "this run's result is from "
                                   "another study config; rerun `quietgpt study` with this config to redo it")
            r = r or extra_rows.get((v, s)) or old_rows.get((v, s))
            rows.append(r or failed_row(v, s, f"runs/{run_name(v, s)}", "no result: the run never finished"))
    return rows


def collect(study_dir: str | Path, spec: StudySpec | None = None, extra_rows: dict | None = None,
            wall_s: float | None = None, machine: dict | None = None) -> dict:
    """Gather every run's row from its folder (or `extra_rows`, or the old results.json), compute the
    statistics, and write results.json and results.csv atomically. Returns the results dict."""
    study_dir = Path(study_dir)
    old = _read(study_dir / "results.json") or {}
    spec = spec or load_spec(study_dir, old)
    old_rows = {(r["variant"], r["seed"]): r for r in old.get("runs", [])}
    rows = _rows(study_dir, spec, extra_rows or {}, old_rows)
    aucs = _auc_metrics(spec)
    trajs = {(r["variant"], r["seed"]): read_trajectory(study_dir / r["dir"]) for r in rows
             if aucs and r.get("status") == "ok" and r.get("dir")}
    for r in rows:
        if (r["variant"], r["seed"]) in trajs:
            r.update({k: m.value({}, {"trajectory": trajs[r["variant"], r["seed"]]}) for k, m in aucs.items()})
    metrics = {**spec.metrics, **aucs}
    results = {
        "config": spec.to_dict(),
        "machine": machine or old.get("machine") or machine_info(spec.device),
        "wall_s": wall_s if wall_s is not None else old.get("wall_s"),
        "metrics": {k: m.describe() for k, m in metrics.items()},
        "metric_order": list(metrics),  # JSON objects are written with sorted keys; this is the table order
        "runs": rows,
        "summary": summarize(rows, list(metrics), spec.arms),
        "comparisons": compare(rows, [k for k, m in metrics.items() if m.compared], spec.arms, spec.baseline_arm,
                               {k: m.label for k, m in metrics.items()},
                               primary=[(h.metric, h.variant) for h in spec.primary], structural=zero_by_construction),
    }
    if spec.primary:
        prereg = (_read(study_dir / "study.json") or {}).get("preregistration")
        first = min((r["started_at"] for r in rows if r.get("started_at")), default=None)
        results["confirmatory"] = {"alpha": spec.alpha, "hypotheses_hash": spec.hypotheses_hash,
                                   "hypotheses": confirm(rows, spec.primary, spec.baseline_arm, spec.alpha),
                                   "preregistration": prereg, "first_run_started": first,
                                   "preregistration_note": describe(prereg, first),
                                   "power": power_table(spec, rows)}
    if aucs:
        results["trajectories"] = trajectory_summary(spec, trajs)
    if spec.sensitivity:
        results["sensitivity"] = sensitivity_summary(study_dir, spec, rows)
    penalties = [f"ppl_ratio_{q}" for q in spec.quant if f"ppl_ratio_{q}" in metrics]
    if penalties:
        results["predictors"] = {"order": [*PREDICTORS, *TRAJECTORY_PREDICTORS],
                                 "runs": predictor_table(rows, penalties),
                                 "trajectory": trajectory_table(trajs, [p for p in penalties if any(
                                     p in t for t in trajs.values())])}
    atomic_write_json(study_dir / "results.json", results)
    atomic_write_text(study_dir / "results.csv", _csv(rows, list(metrics)))
    return results


def _csv(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    cols = ["variant", "seed", "status", "error", *metrics, "dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


# ----------------------------------------------------------------------------- sensitivity


def sensitivity_summary(study_dir: Path, spec: StudySpec, rows: Sequence[dict]) -> dict:
    """results.json's "sensitivity": per config, the groups in order, each arm's mean penalty ratio per group
    over its seeds, and each arm's paired difference to the baseline per group (mean and 95% t interval)."""
    per_run: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("dir"):
            ev = _read(study_dir / r["dir"] / "eval.json") or {}
            per_run[(r["variant"], r["seed"])] = ev.get("sensitivity") or {}
    out = {}
    for q in spec.sensitivity:
        groups = sorted({g for d in per_run.values() for g in d.get(q, {})}, key=group_order)
        arms = {}
        for arm in spec.arms:
            vals = {g: [d[q][g] for (a, _), d in per_run.items() if a == arm and g in d.get(q, {})] for g in groups}
            arms[arm] = {g: {"mean": float(np.mean(v)), "n": len(v)} for g, v in vals.items() if v}
        diffs = {}
        for arm in spec.arms:
            if arm == spec.baseline_arm:
                continue
            by_g = {}
            for g in groups:
                a = {s: per_run[(arm, s)][q][g] for s in spec.seeds if g in per_run.get((arm, s), {}).get(q, {})}
                b = {s: per_run[(spec.baseline_arm, s)][q][g] for s in spec.seeds
                     if g in per_run.get((spec.baseline_arm, s), {}).get(q, {})}
                st = paired(a, b)
                if st["n"]:
                    by_g[g] = {"diff": st["diff_mean"], "ci95": [st["ci95_low"], st["ci95_high"]], "n": st["n"]}
            diffs[arm] = by_g
        out[q] = {"groups": groups, "arms": arms, "diff": diffs}
    return out


# ----------------------------------------------------------------------------- trajectories

# (metric key, threshold, words): a variant "has" the problem once its seed-mean trajectory exceeds the threshold
EMERGENCE = (("sink_rate", 0.3, "sink rate"), ("ppl_ratio_w4a8", 1.1, "W4A8 perplexity penalty"))


def _trajectory_quant(spec: StudySpec) -> list[str]:
    t = spec.run.train
    return [c.name for c in parse_quant_list(t.outlier_quant)] if t.outlier_quant_every > 0 else []


def _auc_metrics(spec: StudySpec) -> dict[str, Metric]:
    """The auc_<metric> metrics of the study's trajectories; none when its runs measure none."""
    return auc_metrics(_trajectory_quant(spec)) if spec.run.train.outlier_interval > 0 else {}


def read_trajectory(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric key: [(iteration, value), ...] in iteration order} from the outlier rows of a run's metrics.jsonl
    (training/outliers.py); {} when there are none. Of two rows at one iteration the later wins."""
    points: dict[str, dict[int, float]] = {}
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("iter"), int) and isinstance(row.get("outliers"), dict):
                    for k, v in row["outliers"].items():
                        if number(v) is not None:
                            points.setdefault(k, {})[row["iter"]] = float(v)
    return {k: sorted(p.items()) for k, p in points.items()}


def seed_mean(curves: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """{iteration: mean over the curves that have a value there} of per-seed {iteration: value} curves."""
    its = sorted({i for c in curves for i in c})
    return {i: float(np.mean([c[i] for c in curves if i in c])) for i in its}


def first_above(curve: Mapping[int, float], threshold: float) -> int | None:
    """The first iteration at which `curve` ({iteration: value}) exceeds `threshold`; None if it never does."""
    return next((i for i in sorted(curve) if curve[i] > threshold), None)


def emergence(trajs: Mapping[tuple[str, int], Mapping[str, Sequence[tuple[int, float]]]], variants: Sequence[str],
              key: str, threshold: float, words: str) -> list[dict]:
    """Per variant with a trajectory of `key`: when its seed-mean first exceeds `threshold` ({variant, metric,
    threshold, first_iter (None: never), last_iter, last_value, n_seeds, text}); one record with variant None
    when no run measured `key`."""
    out = []
    for v in variants:
        curves = [dict(t[key]) for (v2, _), t in sorted(trajs.items()) if v2 == v and t.get(key)]
        if not curves:
            continue
        mean = seed_mean(curves)
        first, last = first_above(mean, threshold), max(mean)
        when = (f"first exceeds {fmt(threshold)} at iteration {first} ({fmt(mean[first], 4)})" if first is not None
                else f"never exceeds {fmt(threshold)} within {last} iterations")
        out.append({"variant": v, "metric": key, "threshold": threshold, "first_iter": first, "last_iter": last,
                    "last_value": mean[last], "n_seeds": len(curves),
                    "text": f"{v}: the {words} (`{key}`, mean over {len(curves)} seeds) {when}; "
                            f"{fmt(mean[last], 4)} at iteration {last}"})
    if not out:
        out.append({"variant": None, "metric": key, "threshold": threshold, "first_iter": None,
                    "text": f"{words} (`{key}`): not in these runs' trajectories, so no statement about "
                            f"exceeding {fmt(threshold)}"})
    return out


def trajectory_summary(spec: StudySpec, trajs: Mapping[tuple[str, int], Mapping]) -> dict:
    """results.json's "trajectories": how they were measured, the metrics they hold (registry descriptions, in
    registry order) and the emergence statements."""
    t = spec.run.train
    metrics = trajectory_metrics(_trajectory_quant(spec))
    present = {k for tr in trajs.values() for k in tr}
    return {"interval": t.outlier_interval, "quant_every": t.outlier_quant_every, "sequences": t.outlier_sequences,
            "quant": _trajectory_quant(spec), "calib_batches": t.outlier_calib_batches,
            "metrics": {k: m.describe() for k, m in metrics.items() if k in present},
            "order": [k for k in metrics if k in present],  # JSON objects are written with sorted keys
            "emergence": [e for key, thr, words in EMERGENCE for e in emergence(trajs, spec.arms, key, thr, words)]}
