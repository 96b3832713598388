"""`quietgpt study`: train every (attention variant, seed) pair, measure each run, compare, report.

The design is paired: for a given seed every variant starts from the same shared initial weights (GPT()
under torch.manual_seed(seed) initialises the shared parameters identically whatever the variant; see
model.py) and sees the same batches in the same order (the training seed drives the data generator), and
every run is measured on the same validation sequences. So variant A and the baseline differ, per seed,
only by the attention normaliser, and the statistics (stats.py) work on per-seed differences.

A study folder:
    study.json                  the resolved StudySpec; a rerun with another config is refused (or --force)
    runs/<variant>-s<seed>/     one run (run.py): checkpoint, metrics.jsonl, summary.json, eval.json,
                                attn_sample.npz, result.json
    results.json, results.csv   all rows, summary, comparisons (results.py)
    report.md, report.html, plots/*.png   (report.py)

The modules: spec.py (what a study is, from TOML), run.py (one run), launch.py (where runs execute),
results.py (gathering and statistics). Whatever ran the runs, results are gathered from the run folders,
so an interrupted study started again skips the finished runs and redoes the rest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from quietgpt.errors import ConfigError, QuietError
from quietgpt.study.launch import StudyInterrupted, StudyProgress, auto_jobs, run_here, run_pool, run_submitit
from quietgpt.study.preregistration import record
from quietgpt.study.results import collect, machine_info
from quietgpt.study.run import execute_run, failed_row, finished, run_name, run_row
from quietgpt.study.spec import StudySpec, differences, resolve_spec
from quietgpt.utils.atomic import atomic_write_json

__all__ = ["StudyInterrupted", "StudySpec", "collect", "execute_run", "failed_row", "rebuild", "resolve_spec",
           "run_name", "run_row", "run_study"]


def run_study(out_dir: str | Path, preset: str = "default", *, variants: Sequence[str] | None = None,
              seeds: int | None = None, baseline: str | None = None, data: str | None = None,
              device: str | None = None, overrides: dict | None = None, quant: Sequence[str] | None = None,
              optimizers: Sequence[str] | None = None, jobs: int | None = None, launcher: str = "local",
              force: bool = False, progress: bool = True, sensitivity: Sequence[str] | None = None,
              seed_start: int | None = None, ensemble: bool | None = None) -> dict:
    """Train and measure every (variant, seed) run not already finished, then write results and report.

    preset: a study preset name or a TOML file (spec.py). jobs: runs at a time; None = auto (launch.py).
    launcher: "local" (jobs=1 in this process, jobs>1 a process pool), "slurm" or "submitit-local".
    Raises QuietError when `out_dir` holds a study with another config, unless force (then runs whose
    config changed are redone). Returns the results dict (results.json).
    """
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConfigError(f"--jobs must be a positive integer, got {jobs!r}")
    if launcher not in ("local", "slurm", "submitit-local"):
        raise ConfigError(f"--launcher must be local or slurm, got {launcher!r}")
    study_dir = Path(out_dir)
    spec = resolve_spec(preset, variants=variants, seeds=seeds, baseline=baseline, data=data, device=device,
                        overrides=overrides, quant=quant, optimizers=optimizers, sensitivity=sensitivity,
                        seed_start=seed_start, ensemble=ensemble)
    if spec.ensemble and launcher != "local":
        raise ConfigError("study.ensemble runs on the local launcher only; drop --launcher slurm or the ensemble")
    if launcher != "slurm":
        # A device this machine lacks, or data that cannot be read, is one error now rather than one failed
        # run per pair; and preparing the data once here means the runs (maybe in parallel) only read it.
        from quietgpt.data.sources import prepare
        from quietgpt.utils.device import resolve_device

        resolve_device(spec.device)
        prepare(spec.run.data)
        for arm in spec.arms:  # a variant/optimizer that cannot be configured fails now, not once per seed
            spec.run_config(arm, spec.seeds[0], study_dir / "runs")
    from quietgpt.runs.lock import RunLock

    lock = RunLock(study_dir).acquire()  # two studies writing one folder would undo each other's runs
    try:
        return _run_locked(study_dir, spec, jobs=jobs, launcher=launcher, force=force, progress=progress)
    finally:
        lock.release()


def _check_same_study(study_dir: Path, spec: StudySpec, force: bool) -> None:
    """Refuse a folder that holds a study with another config (unless force) or other primary hypotheses
    (even with force); then record this one, with the hypotheses' pre-registration record kept from the
    study's first start."""
    spec_path = study_dir / "study.json"
    old: dict = {}
    if spec_path.is_file():
        try:
            old = json.loads(spec_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
    if old and old.get("hypotheses_hash") != spec.hypotheses_hash:
        raise QuietError(f"{study_dir} holds a study with other primary hypotheses; a pre-registered hypothesis "
                         "cannot change once its runs exist: choose another --out for the new hypotheses")
    if old and not force:
        diff = differences(old, spec.to_dict())
        if diff:
            shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise QuietError(f"{study_dir} holds a study with another config (differs in {shown}); rerun with "
                             "the same options, choose another --out, or pass --force to redo changed runs")
    doc = spec.to_dict()
    if spec.hypotheses_hash:
        doc["preregistration"] = old.get("preregistration") or record(spec.hypotheses_hash, spec.source)
    atomic_write_json(spec_path, doc)


def _run_locked(study_dir: Path, spec: StudySpec, *, jobs: int | None, launcher: str, force: bool,
                progress: bool) -> dict:
    from quietgpt.report import write_report

    _check_same_study(study_dir, spec, force)
    t0 = time.perf_counter()
    pairs = [(a, s) for s in spec.seeds for a in spec.arms]  # seed-major: early pairs complete
    done = {p: r for p in pairs if (r := finished(study_dir, spec, *p)) is not None}
    todo = [p for p in pairs if p not in done]
    if jobs is None:  # SLURM: the whole array at once; here: see auto_jobs
        jobs = max(1, len(todo)) if launcher != "local" else auto_jobs(spec.device)
    rows: dict = dict(done)
    bar = StudyProgress(len(pairs), len(done), progress)

    def on_done(row: dict) -> None:
        rows[(row["variant"], row["seed"])] = row
        bar.done(row)

    try:
        if launcher in ("slurm", "submitit-local") and todo:
            run_submitit(spec, todo, str(study_dir), jobs, on_done, local=launcher == "submitit-local")
        elif jobs > 1 and len(todo) > 1:
            run_pool(spec, todo, str(study_dir), min(jobs, len(todo)), on_done)
        else:
            # each run's own training bar sits under the study's bar on a terminal; in a log one line per
            # finished run is enough
            run_here(spec, todo, str(study_dir), bar.start, on_done, progress=progress and bar.tty)
    except KeyboardInterrupt:
        bar.close()
        n_ok = sum(r.get("status") == "ok" for r in rows.values())
        raise StudyInterrupted(f"{n_ok} of {len(pairs)} runs finished; nothing else was started and the running "
                               "runs were stopped; rerun the same command to resume") from None
    finally:
        bar.close()
    # a resumed study's wall time also counts the runs finished by the earlier session(s)
    wall = time.perf_counter() - t0 + sum(r.get("wall_s") or 0.0 for r in done.values())
    machine = machine_info(spec.device) | {"jobs": jobs, "launcher": launcher}
    results = collect(study_dir, spec, extra_rows=rows, wall_s=wall, machine=machine)
    write_report(study_dir)
    return results


def rebuild(study_dir: str | Path) -> dict:
    """`quietgpt report DIR`: re-gather results from the run folders and rewrite results and report."""
    from quietgpt.report import write_report

    results = collect(study_dir)
    return write_report(study_dir) | {"results": results}
