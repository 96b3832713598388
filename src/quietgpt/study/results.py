"""A study's results: gather every run's row, compute the statistics, write results.json and results.csv.

results.json holds the study config, the machine, the wall time, the metrics' descriptions (from the
registry), every run's row, the summary (mean and 95% CI per metric and variant) and the paired
comparisons against the baseline (stats.py). `quietgpt report DIR` rebuilds it from the run folders.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write_json, atomic_write_text
from ..errors import QuietError
from ..stats import compare, summarize
from .run import failed_row, run_config_record, run_name
from .spec import StudySpec, same_record


def machine_info(device: str) -> dict:
    import torch

    from .. import __version__

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
    metrics = spec.metrics
    results = {
        "config": spec.to_dict(),
        "machine": machine or old.get("machine") or machine_info(spec.device),
        "wall_s": wall_s if wall_s is not None else old.get("wall_s"),
        "metrics": {k: m.describe() for k, m in metrics.items()},
        "metric_order": list(metrics),  # JSON objects are written with sorted keys; this is the table order
        "runs": rows,
        "summary": summarize(rows, list(metrics), spec.arms),
        "comparisons": compare(rows, [k for k, m in metrics.items() if m.compared], spec.arms, spec.baseline_arm,
                               {k: m.label for k, m in metrics.items()}),
    }
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
