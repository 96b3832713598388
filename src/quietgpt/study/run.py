"""One study run: train a (variant, seed), measure it, and write its row.

A run folder (runs/<variant>-s<seed>/) is train.py's (checkpoint, metrics.jsonl, summary.json) plus
eval.json (metrics.measure(...).to_dict()), attn_sample.npz (one sample's attention maps) and
result.json: the run's row, written last and atomically, with the run config it was made with. Its
presence with status "ok" and the same run config means "done"; anything else is redone.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from quietgpt.errors import QuietError
from quietgpt.measurement.registry import Metric, number
from quietgpt.study.spec import StudySpec, same_record
from quietgpt.utils.atomic import atomic_write, atomic_write_json


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def run_row(variant: str, seed: int, summary: dict, ev: dict, metrics: Mapping[str, Metric], run_dir: str,
            wall_s: float) -> dict:
    """One results.json row: every study metric of the registry (from the eval dict and train's summary,
    with wall_s the whole run's seconds) plus the run's facts (training wall time, iterations, the data's
    irreducible loss where known) and its folder."""
    facts = {**summary, "wall_s": float(wall_s)}
    row = {"variant": variant, "seed": seed, "status": "ok", "error": None}
    row.update({key: m.value(ev, facts) for key, m in metrics.items()})
    row.update(train_wall_s=number(summary.get("wall_s")), iters=summary.get("iters"),
               irreducible_loss=number(summary.get("irreducible_loss")), dir=run_dir)
    return row


def failed_row(variant: str, seed: int, run_dir: str, error: str, wall_s: float | None = None) -> dict:
    return {"variant": variant, "seed": seed, "status": "failed", "error": " ".join(str(error).split())[:2000],
            "wall_s": wall_s, "dir": run_dir}


def run_config_record(spec: StudySpec, variant: str, seed: int) -> dict:
    """What a run's results depend on, as stored in its result.json: its RunConfig (out_dir left out, so a
    moved study folder still resumes; None when this variant cannot be configured, and that run fails with
    the ConfigError) and the measurement settings."""
    try:
        d = spec.run_config(variant, seed, "x").to_dict()
        d["train"]["out_dir"] = ""
    except QuietError:
        d = None
    return {"run": d, "measure": spec.measure_settings}


def finished(study_dir: Path, spec: StudySpec, variant: str, seed: int) -> dict | None:
    """The run's row if it finished ok with this run config, else None (to be (re)done)."""
    path = study_dir / "runs" / run_name(variant, seed) / "result.json"
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if r.get("status") != "ok" or not same_record(r.get("run_config"), run_config_record(spec, variant, seed)):
        return None
    r.pop("run_config", None)
    return r


def attention_sample(model, tokens: np.ndarray, length: int = 32) -> np.ndarray:
    """Attention probabilities (n_layer, n_head, T, T) float32 of the first `length` validation tokens."""
    import torch

    T = min(length, model.config.block_size, len(tokens))
    idx = torch.from_numpy(np.asarray(tokens[:T], dtype=np.int64))[None]
    probs = {}

    def grab(site, layer, t):
        probs[layer] = t[0].detach().float().cpu().numpy()

    model.eval()
    with torch.no_grad(), model.observe(grab, sites=("attn_probs",)):
        model(idx.to(next(model.parameters()).device))
    return np.stack([probs[i] for i in sorted(probs)]).astype(np.float32)


def _same_config(run_dir: Path, cfg) -> bool:
    """Does the run folder's config.json (written by training) hold this run config?"""
    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    want = cfg.to_dict()
    # training sets model.vocab_size from the data's tokenizer, and with train.init the architecture (and the
    # variant's swap settings) from the pretrained model, so those are not the study's to check; the folder
    # may be named by another path to the same place
    ignore = {"model": {"vocab_size"}, "train": {"out_dir"}}
    if cfg.train.init:
        from quietgpt.interop.pretrained import FROM_PRETRAINED, SWAP_INITS

        rule = SWAP_INITS.get(cfg.model.attention)
        ignore["model"] |= {*FROM_PRETRAINED, *(rule.config if rule is not None else ())}
    return all({k: v for k, v in (saved.get(sec) or {}).items() if k not in ignore.get(sec, ())}
               == {k: v for k, v in want[sec].items() if k not in ignore.get(sec, ())} for sec in want)


def _train(cfg, run_dir: Path, progress: bool) -> dict:
    """Train, resuming an interrupted run of the same config; anything else in the folder is cleared."""
    from quietgpt.training.loop import train
    from quietgpt.training.step import NonFiniteError

    if (run_dir / "train_state.pt").is_file() and _same_config(run_dir, cfg):
        try:
            return train(cfg, resume=True, progress=progress)
        except NonFiniteError:
            raise
        except QuietError:
            pass  # an unreadable resume point: start this run over
    if run_dir.exists():
        shutil.rmtree(run_dir)  # leftovers of an unfinished run (or of another config, with --force)
    return train(cfg, resume=False, progress=progress)


def _measure(spec: StudySpec, cfg, run_dir: Path) -> tuple[dict, np.ndarray]:
    """eval.json's dict and the attention sample of the trained run in run_dir."""
    from quietgpt.data.sources import prepare
    from quietgpt.measurement.evaluate import measure
    from quietgpt.runs.checkpoint import load_model
    from quietgpt.utils.device import resolve_device

    model, _ = load_model(run_dir, device=str(resolve_device(cfg.train.device)))
    dataset = prepare(cfg.data)
    # seed=0 for every run: all runs are measured on the same validation sequences and calibration batches
    ev = measure(model, dataset, quant=list(spec.quant), n_sequences=spec.n_sequences,
                 calib_batches=spec.calib_batches, seed=0, device=str(next(model.parameters()).device),
                 eval_tokens=spec.eval_tokens, sensitivity=list(spec.sensitivity)).to_dict()
    return ev, attention_sample(model, dataset.val)


def _first_start(run_dir: Path, now: float) -> float:
    """When this run first started (unix time), kept in started.json across interruptions and re-measures, so
    that the report can check it against the commit that fixed the study's hypotheses."""
    path = run_dir / "started.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["started_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return now


def _note_start(run_dir: Path, started: float) -> None:
    if not (run_dir / "started.json").is_file():
        atomic_write_json(run_dir / "started.json", {"started_at": started})


def execute_run(spec: StudySpec, variant: str, seed: int, study_dir: str, threads: int = 0,
                progress: bool = False) -> dict:
    """Train and measure one (variant, seed) run; write eval.json, attn_sample.npz and result.json.

    Never raises for a failing run (an exception becomes a row with status "failed" and the error);
    KeyboardInterrupt still stops it. Returns the row. Runs in this process, a pool worker or a SLURM job.
    """
    run_dir, rel = _folder(study_dir, variant, seed)
    t0, started = time.perf_counter(), time.time()
    try:
        _threads(threads)
        cfg = spec.run_config(variant, seed, run_dir)
        summary = _train(cfg, run_dir, progress)
        row = _measure_and_row(spec, variant, seed, cfg, run_dir, summary, started, time.perf_counter() - t0)
    except Exception as e:  # a failed run is recorded with its error, never dropped
        row = failed_row(variant, seed, rel, f"{type(e).__name__}: {e}", time.perf_counter() - t0)
    return _record(spec, variant, seed, run_dir, row)


def execute_ensemble(spec: StudySpec, arm: str, seeds: list[int], study_dir: str, threads: int = 0,
                     progress: bool = False) -> list[dict]:
    """Train every seed of one arm as one ensemble (training/ensemble.py), then measure each member like a
    solo run; one row per seed, in `seeds` order. A member folder holding a resume point of the same config
    continues it; anything else in a member folder is cleared. Each member's wall_s is its share of the
    ensemble's training time plus its own measurement. Never raises for failing members."""
    from quietgpt.training.ensemble import MemberFailed, train_ensemble

    folders = [_folder(study_dir, arm, s) for s in seeds]
    t0, started = time.perf_counter(), time.time()
    try:
        _threads(threads)
        cfgs = [spec.run_config(arm, s, d) for s, (d, _) in zip(seeds, folders, strict=True)]
        resume = []
        for cfg, (d, _) in zip(cfgs, folders, strict=True):
            keep = (d / "train_state.pt").is_file() and _same_config(d, cfg)
            if not keep and d.exists():
                shutil.rmtree(d)  # leftovers of an unfinished run (or of another config, with --force)
            resume.append(keep)
        results = train_ensemble(cfgs, resume=resume, progress=progress)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        return [_record(spec, arm, s, d, failed_row(arm, s, rel, msg, time.perf_counter() - t0))
                for s, (d, rel) in zip(seeds, folders, strict=True)]
    share = (time.perf_counter() - t0) / len(seeds)
    rows = []
    for s, cfg, (d, rel), res in zip(seeds, cfgs, folders, results, strict=True):
        t1 = time.perf_counter()
        try:
            if isinstance(res, MemberFailed):
                raise RuntimeError(res.error)
            row = _measure_and_row(spec, arm, s, cfg, d, res, started, share)
            row["wall_s"] = share + time.perf_counter() - t1
            row["ensemble"] = len(seeds)
        except Exception as e:
            row = failed_row(arm, s, rel, f"{type(e).__name__}: {e}", share + time.perf_counter() - t1)
        rows.append(_record(spec, arm, s, d, row))
    return rows


def _folder(study_dir: str, variant: str, seed: int) -> tuple[Path, str]:
    name = run_name(variant, seed)
    return Path(study_dir) / "runs" / name, f"runs/{name}"


def _threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _measure_and_row(spec: StudySpec, variant: str, seed: int, cfg, run_dir: Path, summary: dict, started: float,
                     wall_s: float) -> dict:
    """Measure the trained run in run_dir (eval.json, attn_sample.npz) and make its row."""
    started = _first_start(run_dir, started)  # an earlier start of this run (interrupted, or re-measured)
    _note_start(run_dir, started)
    t0 = time.perf_counter()
    ev, sample = _measure(spec, cfg, run_dir)
    atomic_write_json(run_dir / "eval.json", ev)

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probs=sample)

    atomic_write(run_dir / "attn_sample.npz", write_npz)
    row = run_row(variant, seed, summary, ev, spec.metrics, f"runs/{run_name(variant, seed)}",
                  wall_s + time.perf_counter() - t0)
    row["started_at"] = started  # unix time: the report checks it against the hypotheses' commit
    if spec.optimizers:  # `variant` is the arm "variant+optimizer": keep its two parts as columns too
        row["attention"], row["optimizer"] = spec.arm_parts(variant)
    return row


def _record(spec: StudySpec, variant: str, seed: int, run_dir: Path, row: dict) -> dict:
    """Write the row as result.json with the config it was made with; a row that cannot be saved is failed."""
    try:
        atomic_write_json(run_dir / "result.json", {**row, "run_config": run_config_record(spec, variant, seed)})
    except (QuietError, OSError) as e:  # not saved, so not finished: listed as failed and redone next time
        row = failed_row(variant, seed, f"runs/{run_name(variant, seed)}", f"{row.get('error') or 'the run finished'}"
                         f"; its result.json could not be written: {e}", row.get("wall_s"))
    return row
