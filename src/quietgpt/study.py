"""`quietgpt study`: train every (attention variant, seed) pair, measure each run, compare, report.

The design is paired: for a given seed every variant starts from the same shared initial weights (GPT()
under torch.manual_seed(seed) initialises the shared parameters identically whatever the variant; see
model.py) and sees the same batches in the same order (the training seed drives the data generator), and
every run is measured on the same validation sequences. So variant A and the baseline differ, per seed,
only by the attention normaliser, and the statistics (stats.py) work on per-seed differences.

A study folder:
    study.json                  the resolved study config; a rerun with another config is refused (or --force)
    runs/<variant>-s<seed>/     train.py's run folder (checkpoint, metrics.jsonl, summary.json) plus
                                eval.json (metrics.measure(...).to_dict()), attn_sample.npz (one sample's
                                attention maps) and result.json (the run's row, written last and atomically:
                                its presence with status "ok" and the same run config means "done")
    results.json, results.csv   all rows, summary (mean and 95% CI per metric and variant), comparisons
    report.md, report.html, plots/*.png   (report.py)

Runs are independent, so they fan out: jobs=1 runs them here one after another (each run's training bar
under the study's bar); jobs=N a local process pool (each worker gets cores // N torch threads, or its own
GPU when there are several; by default one single-threaded run per CPU core, one run per GPU);
launcher="slurm" submits a SLURM job array through submitit. Whatever ran them, results are gathered
from the run folders, so an interrupted study started again skips the finished runs and redoes the rest.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write, atomic_write_json, atomic_write_text
from .errors import ConfigError, QuietError
from .report import ACT_SITES, BASELINE, is_act_site, is_block_weight, write_report
from .stats import compare, summarize

# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class StudyPreset:
    """A study: which training preset, which variants and seeds, which overrides, what to measure."""
    description: str
    train_preset: str = "default"
    variants: tuple[str, ...] = ("softmax", "softmax1", "sink")
    seeds: int = 3
    overrides: dict = field(default_factory=dict)  # {"section.key": value} on top of the training preset
    quant: tuple[str, ...] = ("w8a8", "w6a8", "w4a8")
    n_sequences: int = 32  # validation sequences for perplexity and activation statistics
    calib_batches: int = 8  # calibration batches for activation quantization ranges
    eval_tokens: int | None = None  # perplexity on the first eval_tokens validation tokens (None: all of them)


ALL_VARIANTS = ("softmax", "softmax1", "softmax_n", "sink", "clipped", "gated")

STUDY_PRESETS: dict[str, StudyPreset] = {
    # The README's main command: the whole study (9 runs + measurement) within 10 minutes on 2 CPU cores.
    "default": StudyPreset(
        "the embedded synthetic task; softmax vs softmax1 vs learned sink; 3 seeds; ~10 min on 2 CPU cores",
        eval_tokens=32_768,
        # 9 runs x (training 250 x 16 x 128 tokens + measuring) must fit 10 minutes on 2 CPU cores
        overrides={"train.max_iters": 250, "train.lr_decay_iters": 250, "train.warmup_iters": 25,
                   "train.eval_interval": 125, "train.eval_iters": 10},
    ),
    "shakespeare-char-cpu": StudyPreset(
        "character-level Shakespeare, nanoGPT's CPU model (4 layers, 128 wide, context 64, 2000 iterations); "
        "3 variants x 3 seeds; about an hour on 2 CPU cores",
        train_preset="shakespeare-char-cpu",
    ),
    "shakespeare-char": StudyPreset(
        "nanoGPT's shakespeare-char baby GPT (6 layers, 384 wide, context 256, 5000 iterations) on a GPU; "
        "3 variants x 3 seeds",
        train_preset="shakespeare-char", n_sequences=64, calib_batches=16,
    ),
    "full": StudyPreset(
        "the embedded synthetic task, all six attention variants, 3 seeds (18 runs: about twice the default)",
        variants=ALL_VARIANTS, eval_tokens=32_768,
        overrides={"train.max_iters": 250, "train.lr_decay_iters": 250, "train.warmup_iters": 25,
                   "train.eval_interval": 125, "train.eval_iters": 10},
    ),
    "gpt2-small": StudyPreset(
        "GPT-2 small (124M) on OpenWebText, GPU only: nanoGPT's recipe shortened to 5000 steps of ~0.5M tokens "
        "per run; softmax vs softmax1 vs sink x 3 seeds (use --launcher slurm or --jobs N on a multi-GPU node)",
        train_preset="gpt2-small", n_sequences=128, calib_batches=16,
        overrides={"train.max_iters": 5000, "train.lr_decay_iters": 5000, "train.warmup_iters": 500,
                   "train.eval_interval": 500, "train.eval_iters": 100},
    ),
}


# ----------------------------------------------------------------------------- metrics of a run

METRIC_DEFS: dict[str, tuple[str, str]] = {
    "val_loss": ("validation loss", "train.py's final validation cross-entropy (nats/token), mean over "
                 "train.eval_iters random validation batches"),
    "ppl": ("perplexity (FP)", "exp of the mean cross-entropy of the final model over the whole validation "
            "split (non-overlapping windows of block_size), floating point"),
    "weight_kurtosis_mean": ("weight kurtosis mean", "mean over the block matmul weights (attn.c_attn, "
                             "attn.c_proj, mlp.c_fc, mlp.c_proj of every layer; not embeddings, lm_head, "
                             "LayerNorm, biases, sink logits or gates) of each tensor's kurtosis "
                             "(Pearson, normal = 3)"),
    "weight_kurtosis_max": ("weight kurtosis max", "max over the same block matmul weights of each tensor's "
                            "kurtosis"),
    "act_inf_norm_max": ("activation inf-norm max", "largest |activation| over the observation sites "
                         f"{', '.join(ACT_SITES)} of every layer (all sites except attn_probs)"),
    "act_kurtosis_mean": ("activation kurtosis mean", "mean over the same sites and layers of the "
                          "activation tensor's kurtosis"),
    "unassigned_mass_mean": ("unassigned attention mass", "mean over layers, heads and query positions of "
                             "1 - sum of the attention weights (0 by construction for softmax)"),
    "tokens_per_s": ("training tokens/s", "training throughput (shared CPU: noisy with --jobs > 1)"),
    "wall_s": ("run wall time (s)", "seconds to train and measure the run"),
}
NOT_COMPARED = ("tokens_per_s", "wall_s")  # machine facts, not effects of the attention variant


def metric_defs(quant: Sequence[str]) -> dict[str, dict]:
    """{key: {label, definition}} for every per-run metric, including one ppl_<q> and ppl_ratio_<q> per
    quantization config in the sweep."""
    out = {k: {"label": lab, "definition": d} for k, (lab, d) in METRIC_DEFS.items() if k not in NOT_COMPARED}
    for q in quant:
        out[f"ppl_{q}"] = {"label": f"perplexity ({q})", "definition": f"perplexity with simulated {q} "
                           "quantization of weights and activations (quant.py; calibrated on training batches)"}
    for q in quant:
        out[f"ppl_ratio_{q}"] = {"label": f"{q} / FP perplexity", "definition": f"ppl_{q} / ppl: the "
                                 "quantization penalty (1 = none)"}
    for k in NOT_COMPARED:
        lab, d = METRIC_DEFS[k]
        out[k] = {"label": lab, "definition": d}
    return out


def _num(x) -> float | None:
    """A finite float from a number or a {ppl|perplexity|value: number} dict, else None."""
    if isinstance(x, dict):
        x = next((x[k] for k in ("ppl", "perplexity", "value") if k in x), None)
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _agg(values, fn) -> float | None:
    vals = [v for v in (_num(x) for x in values) if v is not None]
    return float(fn(vals)) if vals else None


def run_row(variant: str, seed: int, summary: dict, ev: dict, quant: Sequence[str], run_dir: str,
            wall_s: float) -> dict:
    """One results.json row from train's summary dict and the eval dict (Measurement.to_dict())."""
    w = [e for e in ev.get("weights", []) if is_block_weight(e)]
    a = [e for e in ev.get("activations", []) if is_act_site(e)]
    att = ev.get("attention", [])
    ppl = ev.get("perplexity", {})
    row = {
        "variant": variant, "seed": seed, "status": "ok", "error": None,
        "val_loss": _num(summary.get("val_loss")),
        "ppl": _num(ppl.get("fp")),
        "weight_kurtosis_mean": _agg([e.get("kurtosis") for e in w], np.mean),
        "weight_kurtosis_max": _agg([e.get("kurtosis") for e in w], max),
        "act_inf_norm_max": _agg([e.get("inf_norm_max") for e in a], max),
        "act_kurtosis_mean": _agg([e.get("kurtosis") for e in a], np.mean),
        "unassigned_mass_mean": _agg([e.get("unassigned_mass") for e in att], np.mean),
        "tokens_per_s": _num(summary.get("tokens_per_s")),
        "wall_s": float(wall_s),
        "train_wall_s": _num(summary.get("wall_s")),
        "iters": summary.get("iters"),
        "irreducible_loss": _num(summary.get("irreducible_loss")),
        "dir": run_dir,
    }
    for q in quant:
        row[f"ppl_{q}"] = _num(ppl.get(q))
        row[f"ppl_ratio_{q}"] = (row[f"ppl_{q}"] / row["ppl"]) if row[f"ppl_{q}"] and row["ppl"] else None
    return row


def failed_row(variant: str, seed: int, run_dir: str, error: str, wall_s: float | None = None) -> dict:
    return {"variant": variant, "seed": seed, "status": "failed", "error": " ".join(str(error).split())[:2000],
            "wall_s": wall_s, "dir": run_dir}


# ----------------------------------------------------------------------------- the study config


def resolve_spec(preset: str = "default", *, variants: Sequence[str] | None = None, seeds: int | None = None,
                 data: str | None = None, device: str | None = None, overrides: dict | None = None,
                 quant: Sequence[str] | None = None) -> dict:
    """The study's full config as a JSON-able dict: the preset's choices, then the caller's.

    `run` is the base RunConfig (without out_dir, seed and attention, which differ per run).
    """
    from .attention import check_variant
    from .config import load_config

    if preset not in STUDY_PRESETS:
        raise ConfigError(f"unknown study preset {preset!r}; choose one of {', '.join(STUDY_PRESETS)}")
    p = STUDY_PRESETS[preset]
    vs = list(p.variants if variants is None else variants)
    if not vs or len(set(vs)) != len(vs):
        raise ConfigError(f"--variants must name distinct attention variants, got {','.join(vs)!r}")
    for v in vs:
        check_variant(v)
    n_seeds = p.seeds if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {n_seeds!r}")
    ov = {**{k: str(v) for k, v in p.overrides.items()}, **{k: str(v) for k, v in (overrides or {}).items()}}
    if data is not None:
        ov["data.source"] = data
    if device is not None:
        ov["train.device"] = device
    for key in ("model.attention", "train.seed", "train.out_dir"):
        if key in ov:
            raise ConfigError(f"{key} is set per run by the study; use --variants/--seeds/--out instead")
    cfg = load_config(p.train_preset, ov)
    qs = list(p.quant if quant is None else quant)
    if qs:
        from .quant import parse_quant_list

        qs = [c.name for c in parse_quant_list(qs)]  # canonical names; a bad spec is a one-line error
    run = cfg.to_dict()
    run["train"]["out_dir"] = ""
    return {
        "preset": preset, "train_preset": p.train_preset, "description": p.description, "variants": vs,
        "seeds": list(range(n_seeds)), "quant": qs, "n_sequences": p.n_sequences,
        "calib_batches": p.calib_batches, "eval_tokens": p.eval_tokens, "overrides": ov, "run": run,
        "baseline": BASELINE,
    }


MEASURE_KEYS = ("quant", "n_sequences", "calib_batches", "eval_tokens")
COMPARED_KEYS = ("variants", "seeds", *MEASURE_KEYS, "run")


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def spec_differences(old: dict, new: dict) -> list[str]:
    """Dotted names of the settings that differ between two specs (only those that change results)."""
    a = _flat({k: old.get(k) for k in COMPARED_KEYS})
    b = _flat({k: new.get(k) for k in COMPARED_KEYS})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def run_config(spec: dict, variant: str, seed: int, run_dir: Path):
    """The RunConfig of one run: the study's base config with this variant, seed and folder."""
    from .config import RunConfig

    return RunConfig.from_dict({**spec["run"], "model": {**spec["run"]["model"], "attention": variant},
                                "train": {**spec["run"]["train"], "seed": seed, "out_dir": str(run_dir)}})


def _run_config_dict(spec: dict, variant: str, seed: int) -> dict:
    """What a run's results depend on, as stored in its result.json: its RunConfig (out_dir left out, so a
    moved study folder still resumes; None when this variant cannot be configured, and that run fails with
    the ConfigError) and the measurement settings."""
    try:
        d = run_config(spec, variant, seed, Path("x")).to_dict()
        d["train"]["out_dir"] = ""
    except QuietError:
        d = None
    return {"run": d, "measure": {k: spec.get(k) for k in MEASURE_KEYS}}


# ----------------------------------------------------------------------------- one run


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
    # training sets model.vocab_size from the data's tokenizer, so that one field is not the study's to check
    # (and the folder may be named by another path to the same place)
    ignore = {"model": "vocab_size", "train": "out_dir"}
    return all({k: v for k, v in (saved.get(sec) or {}).items() if k != ignore.get(sec)}
               == {k: v for k, v in want[sec].items() if k != ignore.get(sec)} for sec in want)


def _train(cfg, run_dir: Path, progress: bool) -> dict:
    """Train, resuming an interrupted run of the same config; anything else in the folder is cleared."""
    from .train import NonFiniteError, train

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


def execute_run(spec: dict, variant: str, seed: int, study_dir: str, threads: int = 0,
                progress: bool = False) -> dict:
    """Train and measure one (variant, seed) run; write eval.json, attn_sample.npz and result.json.

    Never raises for a failing run (an exception becomes a row with status "failed" and the error);
    KeyboardInterrupt still stops it. Returns the row. Runs in this process, a pool worker or a SLURM job.
    """
    name = run_name(variant, seed)
    run_dir = Path(study_dir) / "runs" / name
    rel = f"runs/{name}"
    t0 = time.perf_counter()
    try:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        from .checkpoint import load_model
        from .data import prepare
        from .device import resolve_device
        from .metrics import measure

        cfg = run_config(spec, variant, seed, run_dir)
        summary = _train(cfg, run_dir, progress)
        model, _ = load_model(run_dir, device=str(resolve_device(cfg.train.device)))
        dataset = prepare(cfg.data)
        if spec.get("eval_tokens"):
            dataset = _EvalView(dataset, spec["eval_tokens"])
        # seed=0 for every run: all runs are measured on the same validation sequences and calibration batches
        ev = measure(model, dataset, quant=spec["quant"], n_sequences=spec["n_sequences"],
                     calib_batches=spec["calib_batches"], seed=0, device=str(next(model.parameters()).device))
        ev = ev.to_dict() if hasattr(ev, "to_dict") else ev
        atomic_write_json(run_dir / "eval.json", ev)
        sample = attention_sample(model, dataset.val)

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, probs=sample)

        atomic_write(run_dir / "attn_sample.npz", write_npz)
        row = run_row(variant, seed, summary, ev, spec["quant"], rel, time.perf_counter() - t0)
    except Exception as e:  # a failed run is recorded with its error, never dropped
        row = failed_row(variant, seed, rel, f"{type(e).__name__}: {e}", time.perf_counter() - t0)
    try:
        atomic_write_json(run_dir / "result.json", {**row, "run_config": _run_config_dict(spec, variant, seed)})
    except (QuietError, OSError) as e:  # not saved, so not finished: listed as failed and redone next time
        row = failed_row(variant, seed, rel, f"{row.get('error') or 'the run finished'}; its result.json could "
                         f"not be written: {e}", row.get("wall_s"))
    return row


@dataclass
class _EvalView:
    """A dataset whose validation split is cut to its first n tokens (what metrics.measure reads)."""
    full: object
    n: int

    def __post_init__(self) -> None:
        self.train, self.val = self.full.train, self.full.val[: self.n]
        self.vocab_size, self.tokenizer, self.meta = self.full.vocab_size, self.full.tokenizer, self.full.meta


def _finished(study_dir: Path, spec: dict, variant: str, seed: int) -> dict | None:
    """The run's row if it finished ok with this run config, else None (to be (re)done)."""
    path = study_dir / "runs" / run_name(variant, seed) / "result.json"
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if r.get("status") != "ok" or r.get("run_config") != _run_config_dict(spec, variant, seed):
        return None
    r.pop("run_config", None)
    return r


# ----------------------------------------------------------------------------- launchers

_WORKER_THREADS = 0


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this worker when the study process dies (killed, preempted), so no
    orphan keeps training into a run folder that the restarted study is about to redo."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the study died while this worker was still starting up
        os._exit(1)


def _init_worker(threads: int, gpu_queue, parent: int) -> None:
    """Pool worker start: its share of CPU threads, and its own GPU when there are several."""
    global _WORKER_THREADS
    _WORKER_THREADS = threads
    _die_with_parent(parent)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())


def _pool_run(spec, variant, seed, study_dir):
    return execute_run(spec, variant, seed, study_dir, threads=_WORKER_THREADS, progress=False)


def auto_jobs(device: str) -> int:
    """Runs at a time when --jobs is not given: one per CPU core on CPU, one per GPU on CUDA, 1 on MPS."""
    from .device import resolve_device

    kind = resolve_device(device).type
    if kind == "cuda":
        return max(1, _gpu_count())
    if kind == "cpu":
        return max(1, os.cpu_count() or 1)
    return 1


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _run_pool(spec, todo, study_dir: Path, jobs: int, on_done) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    threads = max(1, (os.cpu_count() or 1) // jobs)
    gpu_queue = None
    n_gpu = _gpu_count() if spec["run"]["train"]["device"] != "cpu" else 0
    if n_gpu > 1:
        gpu_queue = ctx.Manager().Queue()
        for i in range(jobs):
            gpu_queue.put(i % n_gpu)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, gpu_queue, os.getpid())) as pool:
        futs = {pool.submit(_pool_run, spec, v, s, str(study_dir)): (v, s) for v, s in todo}
        for fut in as_completed(futs):
            v, s = futs[fut]
            try:
                row = fut.result()
            except Exception as e:  # the worker died (killed, out of memory) before writing its row
                row = failed_row(v, s, f"runs/{run_name(v, s)}", f"worker died: {type(e).__name__}: {e}")
            on_done(row)


def _run_submitit(spec, todo, study_dir: Path, jobs: int, on_done, local: bool) -> None:
    try:
        import submitit
    except ImportError:
        raise QuietError("--launcher slurm needs submitit: pip install 'quietgpt[slurm]'") from None
    folder = study_dir / "slurm" / "%j"
    if local:  # submitit's local executor: the SLURM code path without a cluster (tests)
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=24 * 60)
    else:
        if shutil.which("sbatch") is None:
            raise QuietError("--launcher slurm needs a SLURM cluster (no sbatch on PATH); use --launcher local")
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        gpu = spec["run"]["train"]["device"] != "cpu"
        ex.update_parameters(name="quietgpt-study", timeout_min=24 * 60, slurm_array_parallelism=jobs,
                             gpus_per_node=1 if gpu else 0, cpus_per_task=8 if gpu else 4)
    n = len(todo)
    submitted = ex.map_array(execute_run, [spec] * n, [v for v, _ in todo], [s for _, s in todo],
                             [str(study_dir)] * n)
    for job, (v, s) in zip(submitted, todo, strict=True):
        try:
            row = job.result()
        except Exception as e:
            row = failed_row(v, s, f"runs/{run_name(v, s)}", f"job {job.job_id} died: {type(e).__name__}: {e}")
        on_done(row)


# ----------------------------------------------------------------------------- results


def machine_info(device: str) -> dict:
    import torch

    from . import __version__

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "quietgpt": __version__}


def collect(study_dir: str | Path, spec: dict | None = None, extra_rows: dict | None = None,
            wall_s: float | None = None, machine: dict | None = None) -> dict:
    """Gather every run's row from its folder (or `extra_rows`, or the old results.json), compute the
    statistics, and write results.json and results.csv atomically. Returns the results dict."""
    study_dir = Path(study_dir)
    old = {}
    if (study_dir / "results.json").is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
            old = json.loads((study_dir / "results.json").read_text(encoding="utf-8"))
    if spec is None:
        try:
            spec = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            spec = old.get("config")
        if not spec:
            raise QuietError(f"{study_dir} holds no study (no study.json or results.json); "
                             f"run `quietgpt study --out {study_dir}` first")
    old_rows = {(r["variant"], r["seed"]): r for r in old.get("runs", [])}
    rows = []
    for v in spec["variants"]:
        for s in spec["seeds"]:
            path = study_dir / "runs" / run_name(v, s) / "result.json"
            r = None
            with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
                r = json.loads(path.read_text(encoding="utf-8"))
                made_with = r.pop("run_config", None)
                if made_with is not None and made_with != _run_config_dict(spec, v, s):
                    r = failed_row(v, s, r.get("dir") or f"runs/{run_name(v, s)}", "this run's result is from "
                                   "another study config; rerun `quietgpt study` with this config to redo it")
            r = r or (extra_rows or {}).get((v, s)) or old_rows.get((v, s))
            rows.append(r or failed_row(v, s, f"runs/{run_name(v, s)}", "no result: the run never finished"))
    defs = metric_defs(spec["quant"])
    compared = [m for m in defs if m not in NOT_COMPARED]
    results = {
        "config": spec,
        "machine": machine or old.get("machine") or machine_info(spec["run"]["train"]["device"]),
        "wall_s": wall_s if wall_s is not None else old.get("wall_s"),
        "metrics": defs,
        "metric_order": list(defs),  # JSON objects are written with sorted keys; this is the table order
        "runs": rows,
        "summary": summarize(rows, list(defs), spec["variants"]),
        "comparisons": compare(rows, compared, spec["variants"], spec.get("baseline", BASELINE),
                               {k: d["label"] for k, d in defs.items()}),
    }
    atomic_write_json(study_dir / "results.json", results)
    atomic_write_text(study_dir / "results.csv", _csv(rows, list(defs)))
    return results


def _csv(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    cols = ["variant", "seed", "status", "error", *metrics, "dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


def rebuild(study_dir: str | Path) -> dict:
    """`quietgpt report DIR`: re-gather results from the run folders and rewrite results and report."""
    results = collect(study_dir)
    return write_report(study_dir) | {"results": results}


# ----------------------------------------------------------------------------- the study


class _Overall:
    """The study's progress: runs done of total with an ETA; a tqdm bar on a terminal, else plain lines."""

    def __init__(self, total: int, initial: int, enabled: bool):
        import sys

        self.total, self.n, self.enabled = total, initial, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0, self.n0, self.bar = time.perf_counter(), initial, None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="study", unit="run", position=0,
                            dynamic_ncols=True, file=sys.stderr)
        elif enabled and initial:
            self._line(f"{initial} of {total} runs already finished; skipping them")

    def _line(self, text: str) -> None:
        import sys

        print(f"quietgpt study: {text}", file=sys.stderr, flush=True)

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name} running")

    def done(self, row: dict) -> None:
        self.n += 1
        status = "ok" if row["status"] == "ok" else f"FAILED ({row.get('error')})"
        name = run_name(row["variant"], row["seed"])
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name} {'ok' if row['status'] == 'ok' else 'FAILED'}")
            self.bar.update(1)
        elif self.enabled:
            rate = (self.n - self.n0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - self.n) / rate
            self._line(f"[{self.n}/{self.total}] {name} {status} in {row.get('wall_s') or 0:.0f}s; "
                       f"eta {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()



def run_study(out_dir: str | Path, preset: str = "default", *, variants: Sequence[str] | None = None,
              seeds: int | None = None, data: str | None = None, device: str | None = None,
              overrides: dict | None = None, quant: Sequence[str] | None = None, jobs: int | None = None,
              launcher: str = "local", force: bool = False, progress: bool = True) -> dict:
    """Train and measure every (variant, seed) run not already finished, then write results and report.

    jobs: runs at a time; None = auto: one single-threaded run per CPU core on CPU (small models use
    cores far better side by side than through intra-op threads), one run per GPU on CUDA, 1 on MPS.
    launcher: "local" (jobs=1 in this process, jobs>1 a process pool), "slurm" (a submitit job array
    with at most `jobs` running at once) or "submitit-local" (submitit's local executor: the SLURM code
    path on one machine). Raises QuietError when `out_dir` holds a study with another config, unless
    force (then runs whose config changed are redone). Returns the results dict (results.json).
    """
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConfigError(f"--jobs must be a positive integer, got {jobs!r}")
    if launcher not in ("local", "slurm", "submitit-local"):
        raise ConfigError(f"--launcher must be local or slurm, got {launcher!r}")
    study_dir = Path(out_dir)
    spec = resolve_spec(preset, variants=variants, seeds=seeds, data=data, device=device, overrides=overrides,
                        quant=quant)
    if launcher != "slurm":
        # A device this machine lacks, or data that cannot be read, is one error now rather than one failed
        # run per pair; and preparing the data once here means the runs (maybe in parallel) only read it.
        from .data import prepare
        from .device import resolve_device

        resolve_device(spec["run"]["train"]["device"])
        prepare(run_config(spec, spec["variants"][0], spec["seeds"][0], study_dir / "runs").data)
    from .runfolder import RunLock

    lock = RunLock(study_dir).acquire()  # two studies writing one folder would undo each other's runs
    try:
        return _run_locked(study_dir, spec, jobs=jobs, launcher=launcher, force=force, progress=progress)
    finally:
        lock.release()


def _run_locked(study_dir: Path, spec: dict, *, jobs: int, launcher: str, force: bool, progress: bool) -> dict:
    spec_path = study_dir / "study.json"
    if spec_path.is_file() and not force:
        try:
            old = json.loads(spec_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        diff = spec_differences(old, spec)
        if diff:
            shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise QuietError(f"{study_dir} holds a study with another config (differs in {shown}); rerun with "
                             "the same options, choose another --out, or pass --force to redo changed runs")
    atomic_write_json(spec_path, spec)

    t0 = time.perf_counter()
    pairs = [(v, s) for s in spec["seeds"] for v in spec["variants"]]  # seed-major: early pairs complete
    done = {p: r for p in pairs if (r := _finished(study_dir, spec, *p)) is not None}
    todo = [p for p in pairs if p not in done]
    if jobs is None:  # SLURM: the whole array at once; here: see auto_jobs
        jobs = max(1, len(todo)) if launcher != "local" else auto_jobs(spec["run"]["train"]["device"])
    rows: dict = dict(done)
    bar = _Overall(len(pairs), len(done), progress)
    # each run's own training bar sits under the overall bar on a terminal; in a log (no terminal) one line
    # per finished run is enough, and pool or SLURM workers never draw bars
    run_progress = progress and bar.tty

    def on_done(row: dict) -> None:
        rows[(row["variant"], row["seed"])] = row
        bar.done(row)

    try:
        if launcher in ("slurm", "submitit-local") and todo:
            _run_submitit(spec, todo, study_dir, jobs, on_done, local=launcher == "submitit-local")
        elif jobs > 1 and len(todo) > 1:
            _run_pool(spec, todo, study_dir, min(jobs, len(todo)), on_done)
        else:
            for v, s in todo:
                bar.start(run_name(v, s))
                on_done(execute_run(spec, v, s, str(study_dir), progress=run_progress))
    finally:
        bar.close()
    # a resumed study's wall time also counts the runs finished by the earlier session(s)
    wall = time.perf_counter() - t0 + sum(r.get("wall_s") or 0.0 for r in done.values())
    machine = machine_info(spec["run"]["train"]["device"]) | {"jobs": jobs, "launcher": launcher}
    results = collect(study_dir, spec, extra_rows=rows, wall_s=wall, machine=machine)
    write_report(study_dir)
    return results
