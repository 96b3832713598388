"""Train S seeds of one configuration as one batched ensemble (`quietgpt train --seeds 0-9`, `[study]
ensemble = true`): the same runs, each in its own folder, at a fraction of the process-pool's cost when the
model is small.

Each member is a solo run in every part but the forward and backward: setup_run builds it (its seeded init,
data, optimizer, resume point), it keeps its own TrainBatches (its data order), NonFiniteGuard, Evaluator,
OutlierTracker, Checkpointer and RunLog, so its folder holds what a solo run's holds and resumes alone or
with the ensemble. nn/ensemble.py's EnsembleGPT stacks the members' weights (each member's parameters
become views of its slice) and runs their batches side by side; each member's loss is its own mean
cross-entropy and their sum is differentiated, so each member's gradient is its solo gradient. Then every
member takes its own step: its gradient clipping, its non-finite policy (a member that fails stops, keeping
its last good checkpoint, and the others go on), its optimizer (AdamW, Muon, OrthoAdam: a solo run's).

Members need not stand at one iteration: a member whose resume point is ahead (its checkpoints came at other
evals) waits, its batch not drawn, until the others catch up. Refused, with a one-line error naming why:
dropout, several processes (torchrun), float16 (a GradScaler is one per run), torch.compile, members whose
configs differ in anything but seed and folder, and an S whose memory estimate exceeds what the device has.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quietgpt.config import RunConfig
from quietgpt.errors import ConfigError, QuietError
from quietgpt.nn.ensemble import EnsembleGPT
from quietgpt.runs.lock import RunLock
from quietgpt.training.checkpointer import Checkpointer
from quietgpt.training.distributed import Dist
from quietgpt.training.evaluate import Evaluator
from quietgpt.training.loop import _summary
from quietgpt.training.outliers import OutlierTracker
from quietgpt.training.reporting import Clock, RunLog
from quietgpt.training.schedule import get_lr
from quietgpt.training.setup import TrainRun, setup_run
from quietgpt.training.step import NonFiniteError, NonFiniteGuard, finish_step, set_lr
from quietgpt.utils.device import allow_tf32, resolve_device

__all__ = ["MemberFailed", "check_ensemble", "memory_estimate", "parse_seeds", "train_ensemble"]


@dataclass
class MemberFailed:
    """A member that stopped: its seed, folder and the one-line error (what its study row says)."""
    seed: int
    out: str
    error: str


def parse_seeds(text: str) -> list[int]:
    """"0-9" / "0,2,5" / "3" -> seeds (distinct, in order); a one-line QuietError otherwise."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            a, dash, b = part.strip().partition("-")
            seeds += list(range(int(a), int(b) + 1)) if dash else [int(a)]
    except ValueError:
        raise QuietError(f"--seeds {text!r} is not a list of seeds; write e.g. 0-9 or 0,3,7") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise QuietError(f"--seeds {text!r} must name distinct seeds >= 0, e.g. 0-9")
    return seeds


def check_ensemble(cfgs: list[RunConfig]) -> None:
    """One-line ConfigError unless these run configs can train as one ensemble."""
    if not cfgs:
        raise ConfigError("an ensemble needs at least one seed")
    c0 = cfgs[0]

    def shared(c: RunConfig) -> dict:
        d = c.to_dict()
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("seed", "out_dir")}
        return d

    if any(shared(c) != shared(c0) for c in cfgs):
        raise ConfigError("ensemble members must share every setting but train.seed and train.out_dir")
    if len({c.train.out_dir for c in cfgs}) != len(cfgs):
        raise ConfigError("ensemble members need one folder each (train.out_dir)")
    tc = c0.train
    why = ("model.dropout > 0: each solo run draws its dropout masks from its own stream; set model.dropout=0"
           if c0.model.dropout > 0 else
           "several processes (torchrun): an ensemble is one process; run it without torchrun"
           if int(os.environ.get("WORLD_SIZE", "1")) > 1 else
           "train.dtype float16: its GradScaler is one per run; use bfloat16 or float32" if tc.dtype == "float16" else
           "train.compile: not supported for ensembles yet; set train.compile=false" if tc.compile else None)
    if why:
        raise ConfigError(f"cannot train seeds as one ensemble with {why}, or train them one by one")


def memory_estimate(run: TrainRun, members: int) -> int:
    """Bytes an ensemble of `members` such runs needs, roughly: weights, gradients and optimizer state (4 copies)
    and the activations autograd keeps per member (about 34 values per token per layer and width, plus the
    logits twice), in the run's float precision."""
    m = run.cfg.model
    tokens = run.cfg.train.batch_size * m.block_size
    params = run.parts.base_model.num_params()
    acts = tokens * (34 * m.n_layer * m.n_embd + 2 * m.vocab_size + m.n_layer * m.n_head * m.block_size * 2)
    return 4 * members * (4 * params + acts)


def _available(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def peak_memory(device: torch.device) -> int:
    """This process's peak memory so far in bytes: CUDA's max allocated, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class _Member:
    """One member's solo parts and where it stands."""
    run: TrainRun
    log: RunLog
    clock: Clock
    saver: Checkpointer
    guard: NonFiniteGuard
    evaluate: Evaluator
    outliers: OutlierTracker
    start: int
    failed: MemberFailed | None = None
    losses: list[float] = field(default_factory=list)

    def active(self, it: int) -> bool:
        return self.failed is None and it >= self.start


def _member(run: TrainRun, progress: bool) -> _Member:
    cfg, state, tc, parts = run.cfg, run.state, run.cfg.train, run.parts
    log = RunLog(cfg, run.out, start=state.iter, resume=run.resume, master=True, progress=False)
    clock = Clock(state, parts.device, run.tokens_per_step)
    saver = Checkpointer(run.out, cfg, run.extras, parts, run.batches, clock, master=True,
                         last_saved=state.iter if run.resume else None)
    guard = NonFiniteGuard(tc, parts.device, run.dist, kept=saver.kept)
    evaluate = Evaluator(parts.eval_model, run.dataset, tc, cfg.model.block_size, parts.device, parts.amp, log,
                         master=True)
    outliers = OutlierTracker(parts.base_model, run.dataset, tc, cfg.model.block_size, parts.device, log,
                              master=True)
    return _Member(run, log, clock, saver, guard, evaluate, outliers, state.iter)


def train_ensemble(cfgs: list[RunConfig], *, resume: bool | list[bool] = False, progress: bool = True
                   ) -> list[dict | MemberFailed]:
    """Train every config (one per seed, each with its own train.out_dir) as one ensemble; per member its
    summary (as train() returns and writes), or a MemberFailed for a member whose non-finite policy stopped
    it. resume: for all members, or one flag each (a folder with a resume point continues from it)."""
    check_ensemble(cfgs)
    flags = resume if isinstance(resume, list) else [resume] * len(cfgs)
    t_start = time.perf_counter()
    device = resolve_device(cfgs[0].train.device)
    allow_tf32(device)
    locks = [RunLock(c.train.out_dir) for c in cfgs]
    try:
        for lock in locks:
            lock.acquire()
        runs = [setup_run(c, device, Dist(), resume=r, progress=False) for c, r in zip(cfgs, flags, strict=True)]
        need, have = memory_estimate(runs[0], len(runs)), _available(device)
        if have is not None and need > 0.8 * have:
            cap = max(1, int(0.8 * have // max(1, need // len(runs))))
            raise QuietError(f"{len(runs)} members need about {need / 2**30:.1f} GiB and {device} has "
                             f"{have / 2**30:.1f} GiB free; train at most {cap} seeds at once")
        members = [_member(r, progress) for r in runs]
        ens = EnsembleGPT([r.parts.base_model for r in runs])
        if progress:
            print(f"quietgpt train: an ensemble of {len(runs)} seeds ({', '.join(str(c.train.seed) for c in cfgs)}), "
                  f"{runs[0].parts.base_model.num_params() / 1e6:.2f}M parameters each, attention "
                  f"{cfgs[0].model.attention}, on {device}", file=sys.stderr, flush=True)
        _loop(ens, members, t_start, progress)
        out: list[dict | MemberFailed] = []
        for m in members:
            if m.failed is not None:
                out.append(m.failed)
            else:
                s = _summary(m.run, m.clock, t_start, m.log)
                out.append({**s, "ensemble_members": len(members), "peak_memory_bytes": peak_memory(device)})
        return out
    finally:
        for lock in locks:
            lock.release()


def _evaluate_due(members: list[_Member], it: int, final: bool = False) -> None:
    """Each member's outliers, eval and save of the state after `it` steps, as the solo loop does them (not at
    a member's resume point: that checkpoint exists; the final one unless the member was already finished);
    every member's clock paused meanwhile (the time is the ensemble's)."""
    for m in members:
        m.clock.pause(m.run.state)
    for m in members:
        tc, state = m.run.cfg.train, m.run.state
        if final:
            due = m.failed is None and not (m.run.resume and m.start == tc.max_iters and state.last_losses)
            due_eval = due_out = due
        else:
            due = m.active(it) and not (m.run.resume and it == m.start and it > 0)
            due_eval, due_out = due and it % tc.eval_interval == 0, due and m.outliers.due(it)
        try:
            if due_eval or due_out:
                m.guard.check_deferred()  # never evaluate, let alone save, a state that went non-finite
            if due_out:
                m.outliers(it)
            if due_eval:
                state.last_losses = m.evaluate(it)
                m.saver.after_eval(state, final=final)
        except NonFiniteError as e:
            m.failed = MemberFailed(m.run.cfg.train.seed, str(m.run.out), str(e))
    for m in members:
        m.clock.resume()


def _loop(ens: EnsembleGPT, members: list[_Member], t_start: float, progress: bool) -> None:
    tc = members[0].run.cfg.train
    first = min(m.start for m in members)
    try:
        for it in range(first, tc.max_iters):
            _evaluate_due(members, it)
            stepping = [m for m in members if m.active(it)]
            if not stepping:
                continue
            _step(ens, members, stepping, it, get_lr(it, tc))
        _evaluate_due(members, tc.max_iters, final=True)
    finally:
        for m in members:
            m.log.close()


def _step(ens: EnsembleGPT, members: list[_Member], stepping: list[_Member], it: int, lr: float) -> None:
    """One optimizer step of every stepping member: their batches side by side (a waiting or failed member's
    rows are zeros and its loss is ignored), one backward of the summed losses, then each member's own
    clipping, non-finite policy and optimizer step."""
    drawn = {id(m): m.run.batches.next() for m in stepping}
    accum = len(next(iter(drawn.values())))
    ref = next(iter(drawn.values()))[0][0]
    sums = {id(m): torch.zeros((), device=ref.device) for m in stepping}
    amp = stepping[0].run.parts.amp
    for k in range(accum):
        xs = [drawn[id(m)][k][0] if id(m) in drawn else torch.zeros_like(ref) for m in members]
        ys = [drawn[id(m)][k][1] if id(m) in drawn else torch.zeros_like(ref) for m in members]
        with amp:
            _, losses = ens(torch.stack(xs), torch.stack(ys))
        keep = torch.tensor([id(m) in drawn for m in members], device=losses.device)
        for i, m in enumerate(members):
            if id(m) in drawn:
                sums[id(m)] += losses[i].detach().float()
        (torch.where(keep, losses, torch.zeros_like(losses)).sum() / accum).backward()
    ens.member_grads([m.run.parts.base_model for m in members])
    for m in stepping:
        state, parts = m.run.state, m.run.parts
        set_lr(parts.optimizer, lr)
        try:
            res = finish_step(parts, sums[id(m)], accum, it=it, guard=m.guard)
        except NonFiniteError as e:
            m.failed = MemberFailed(m.run.cfg.train.seed, str(m.run.out), str(e))
            continue
        state.iter = it + 1
        if res.skipped:
            state.nonfinite_skips += 1
            m.log.skip(it, state.nonfinite_skips)
            try:
                m.guard.check_skip_limit(it, state.nonfinite_skips)
            except NonFiniteError as e:
                m.failed = MemberFailed(m.run.cfg.train.seed, str(m.run.out), str(e))
            continue
        state.tokens += m.run.tokens_per_step
        m.clock.step()
        tc = m.run.cfg.train
        if it % tc.log_interval == 0 or it == tc.max_iters - 1:
            loss = float(res.loss_sum) / res.micro_batches
            m.losses.append(loss)
            m.log.step(it, loss, lr, res.grad_norm, m.clock.lap(state))
    for m in members:  # a waiting or failed member's gradient slices: dropped, never applied
        m.run.parts.optimizer.zero_grad(set_to_none=True)
    ens.zero_grad(set_to_none=True)


def ensemble_configs(cfg: RunConfig, seeds: list[int], out: str | Path) -> list[RunConfig]:
    """One config per seed, each in its own folder `out`/s<seed>."""
    from quietgpt.config import apply_overrides

    return [apply_overrides(cfg, {"train.seed": s, "train.out_dir": str(Path(out) / f"s{s}")}) for s in seeds]

