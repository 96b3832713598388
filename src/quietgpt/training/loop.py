"""Training: karpathy/nanoGPT's train.py as a function, with exact resume, DDP and honest throughput.

Semantics follow nanoGPT: random contiguous windows of the token memmap, AdamW (fused where available)
with decay/no-decay groups, linear warmup then cosine decay to min_lr, gradient accumulation, gradient
clipping, an eval of train and val loss over eval_iters batches every eval_interval iterations, AMP on
CUDA (bf16, or fp16 with a GradScaler), TF32 float32 matmuls on CUDA, optional torch.compile.
Differences, each for a reason:

* Randomness lives in explicit generators. The training windows come from one CPU torch.Generator
  (its state *is* the data position, saved in checkpoints); eval batches come from generators re-seeded
  at every eval, so an eval never moves the training stream and every eval (and every variant at the
  same seed) scores the same batches. On CPU a run is a pure function of its config: resume is exact.
* DDP: every rank walks the same global stream of grad_accum micro-batches and keeps its own
  consecutive share, so N ranks compute exactly the update one process computes with the same global
  batch (nanoGPT gives each rank its own seed, which makes the two incomparable).
* Iteration i (0-based) is the i-th optimizer step; evals happen on the state after i steps when
  i % eval_interval == 0, and after the last step. max_iters = 2000 means 2000 steps. Outlier trajectory
  points (train.outlier_interval > 0; training/outliers.py) likewise, when i % outlier_interval == 0.
* No per-step host sync on accelerators: losses stay on the device and are read at log intervals.
  On CPU every step checks for non-finite values (free there: CPU work is synchronous).

This module is the entry point and the loop; the parts live in quietgpt.training (torchtitan's shape: a
short loop of calls over components that own their state):

    training.setup         setup_run: checks, data, model, optimizer, resume point -> TrainRun
    training.state         TrainState: everything resumable besides the model/optimizer/scaler state dicts
    training.step          train_step: one optimizer step; NonFiniteGuard: train.nonfinite's policy
    training.evaluate      Evaluator: estimate_loss on rank 0 + its metrics row
    training.outliers      OutlierTracker: the registry's trajectory metrics every train.outlier_interval steps
    training.checkpointer  Checkpointer: what is saved when, in which order
    training.reporting     RunLog (metrics.jsonl, trackers, progress), Clock (training vs wall time)
    training.batches       the data and each rank's micro-batches
    training.distributed   torchrun -> process group, collectives, teardown
    training.schedule      get_lr, derive_seed
"""

from __future__ import annotations

import math
import time

from quietgpt.config import RunConfig
from quietgpt.runs.lock import RunLock
from quietgpt.training.checkpointer import Checkpointer
from quietgpt.training.distributed import setup_distributed, teardown_distributed
from quietgpt.training.evaluate import Evaluator
from quietgpt.training.outliers import OutlierTracker
from quietgpt.training.reporting import Clock, RunLog
from quietgpt.training.schedule import derive_seed, get_lr
from quietgpt.training.setup import TrainRun, setup_run
from quietgpt.training.step import NonFiniteError, NonFiniteGuard, train_step
from quietgpt.utils.atomic import atomic_write_json
from quietgpt.utils.device import allow_tf32, resolve_device

__all__ = ["NonFiniteError", "derive_seed", "get_lr", "train"]


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg's model on cfg's data into cfg.train.out_dir and return the summary (== summary.json).

    resume=True continues from out_dir/train_state.pt exactly where it stopped (same config architecture
    and data required; max_iters and other train settings may change). Raises QuietError (one line) on
    bad input before anything in out_dir is touched, NonFiniteError when training diverges.
    """
    t_start = time.perf_counter()
    d, device = setup_distributed(cfg.train, resolve_device(cfg.train.device))
    allow_tf32(device)
    lock = RunLock(cfg.train.out_dir)
    finished = False
    try:
        if d.master:
            lock.acquire()
        run = setup_run(cfg, device, d, resume=resume, progress=progress)
        summary = _loop(run, progress=progress and d.master, t_start=t_start)
        finished = True
        return summary
    finally:
        lock.release()
        teardown_distributed(d, finished=finished)


def _loop(run: TrainRun, *, progress: bool, t_start: float) -> dict:
    """Train `run` from run.state to max_iters steps, measuring outliers, evaluating and saving on schedule;
    the summary."""
    cfg, state, d = run.cfg, run.state, run.dist
    tc, parts, start = cfg.train, run.parts, state.iter
    log = RunLog(cfg, run.out, start=start, resume=run.resume, master=d.master, progress=progress)
    if progress:
        log.note(f"quietgpt train: {parts.base_model.num_params() / 1e6:.2f}M parameters, attention "
                 f"{cfg.model.attention}, {d.world} process(es) on {parts.device}, {run.tokens_per_step:,} "
                 f"tokens/iter, out {run.out}")
    clock = Clock(state, parts.device, run.tokens_per_step)
    saver = Checkpointer(run.out, cfg, run.extras, parts, run.batches, clock, master=d.master,
                         last_saved=start if run.resume else None)
    guard = NonFiniteGuard(tc, parts.device, d, kept=saver.kept)
    evaluate = Evaluator(parts.eval_model, run.dataset, tc, cfg.model.block_size, parts.device, parts.amp, log,
                         master=d.master)
    outliers = OutlierTracker(parts.base_model, run.dataset, tc, cfg.model.block_size, parts.device, log,
                              master=d.master)
    try:
        for it in range(start, tc.max_iters):
            # measure outliers, eval and checkpoint the state after `it` steps, in that order (so rows at a
            # checkpoint's iteration precede it); skipped at the resume point: that checkpoint already exists
            # and nothing changed since
            due_eval, due_outliers = it % tc.eval_interval == 0, outliers.due(it)
            if (due_eval or due_outliers) and not (run.resume and it == start and it > 0):
                guard.check_deferred()  # never evaluate, let alone save, a state that went non-finite
                clock.pause(state)
                if due_outliers:
                    outliers(it)
                if due_eval:
                    state.last_losses = evaluate(it)
                    saver.after_eval(state)
                clock.resume()

            lr = get_lr(it, tc)
            step = train_step(parts, run.batches.next(), it=it, lr=lr, guard=guard)
            state.iter = it + 1
            log.advance()
            if step.skipped:
                state.nonfinite_skips += 1
                log.skip(it, state.nonfinite_skips)
                guard.check_skip_limit(it, state.nonfinite_skips)
                continue
            state.tokens += run.tokens_per_step
            clock.step()

            # log: the only place the host waits for the device
            if it % tc.log_interval == 0 or it == tc.max_iters - 1:
                loss = step.mean_loss(d)
                guard.check_deferred()
                log.step(it, loss, lr, step.grad_norm, clock.lap(state))

        # final eval and checkpoint on the state after max_iters steps (nothing to do when a resumed run
        # was already there)
        guard.check_deferred()
        clock.pause(state)
        if not (run.resume and start == tc.max_iters and state.last_losses):
            outliers(tc.max_iters)
            state.last_losses = evaluate(tc.max_iters)
            saver.after_eval(state, final=True)
    finally:
        log.close()
    return _summary(run, clock, t_start, log)


def _summary(run: TrainRun, clock: Clock, t_start: float, log: RunLog) -> dict:
    """The run's summary; rank 0 also writes it as summary.json and says where the run is."""
    cfg, state, d = run.cfg, run.state, run.dist
    wall = clock.wall()
    summary = {
        "train_loss": state.last_losses.get("train"), "val_loss": state.last_losses.get("val"),
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "iters": cfg.train.max_iters, "tokens": state.tokens,
        # training steps only
        "tokens_per_s": state.tokens / state.train_time_s if state.train_time_s > 0 else None,
        "tokens_per_s_wall": state.tokens / wall if wall > 0 else None,  # evals and checkpoints included
        "wall_s": wall, "prepare_s": clock.start - t_start,
        "attention": cfg.model.attention, "seed": cfg.train.seed, "n_params": run.parts.base_model.num_params(),
        "device": str(run.parts.device), "world_size": d.world, "nonfinite_skips": state.nonfinite_skips,
        "data": cfg.data.source, "vocab_size": cfg.model.vocab_size, "out_dir": str(run.out),
    }
    if run.dataset.meta.get("irreducible_loss") is not None:
        summary["irreducible_loss"] = run.dataset.meta["irreducible_loss"]
    if d.master:
        atomic_write_json(run.out / "summary.json", summary)
        log.note(f"done: val loss {summary['val_loss']:.4f}, {summary['tokens_per_s'] or 0:,.0f} tok/s, "
                 f"{wall:.1f}s; wrote {run.out}")
    return summary
