"""One optimizer step, the way train() takes it and benchmarks/train_gpu.py times it.

train_step runs a rank's micro-batches with gradient accumulation (DDP all-reduces on the last one only),
under AMP autocast and, for fp16, a GradScaler; clips the gradient norm; applies train.nonfinite's policy;
steps the optimizer. build_step_parts makes what it needs from a model and a TrainConfig.

No per-step host sync on accelerators: the loss and gradient norm stay on the device and are read at log
intervals, and non-finite values are flagged on the device and checked there too (NonFiniteGuard). On CPU
every step checks (free there: CPU work is synchronous).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from quietgpt.config import TrainConfig
from quietgpt.errors import QuietError
from quietgpt.nn.model import GPT
from quietgpt.training.distributed import Dist, all_max, all_mean
from quietgpt.training.optim import build_optimizer
from quietgpt.utils.device import amp_context

__all__ = ["NonFiniteError", "NonFiniteGuard", "StepParts", "StepResult", "build_step_parts", "check_every_step",
           "finish_step", "set_lr", "train_step"]


class NonFiniteError(QuietError):
    """Training produced a non-finite loss or gradient (train.nonfinite = "stop", or too many skips)."""


def check_every_step(device: torch.device, tc: TrainConfig) -> bool:
    """Check for non-finite values after every step (a host sync), or only at log intervals and before
    evals/saves? Every step on CPU (syncs cost nothing there) and when skipping (the decision must precede
    optimizer.step()); otherwise deferred, with the first bad iteration tracked on the device."""
    return device.type == "cpu" or tc.nonfinite == "skip"


class NonFiniteGuard:
    """train.nonfinite's policy: "stop" raises NonFiniteError, "skip" drops the step (up to
    train.max_nonfinite_skips times). Checked after every step where check_every_step says so, else flagged
    on the device and raised by check_deferred(), naming the first bad iteration.

    kept: returns what the error message says about the checkpoint that survives, e.g. "the last good
    checkpoint (iteration 300) in out is kept" (training's Checkpointer.kept); default: none was written.
    """

    def __init__(self, tc: TrainConfig, device: torch.device, d: Dist | None = None, *,
                 kept: Callable[[], str] | None = None):
        self.policy, self.max_skips = tc.nonfinite, tc.max_nonfinite_skips
        self.every_step = check_every_step(device, tc)
        self.dist = d or Dist()
        self.kept = kept or (lambda: "no checkpoint was written yet")
        self._flag = torch.zeros((), device=device)  # deferred: any bad step since the start
        self._first = torch.full((), -1, dtype=torch.long, device=device)  # deferred: the first bad iteration

    def error(self, it: int, what: str, detail: str = "") -> NonFiniteError:
        """The one-line error for a non-finite `what` ("loss", "gradient", ...) at iteration `it`."""
        return NonFiniteError(f"non-finite {what} at iteration {it}{detail}; {self.kept()}; lower "
                              "train.learning_rate, or set train.nonfinite=skip")

    def should_skip(self, it: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor, micro_batches: int, *,
                    scaled: bool) -> bool:
        """Judge step `it` before optimizer.step(): True to drop it (policy "skip"); raises NonFiniteError
        (policy "stop"); False when it is finite, or when checking is deferred (then flagged on the device).
        scaled: a GradScaler is in use, so inf gradients are its business (it skips and rescales) and only
        the loss is judged."""
        bad = ~torch.isfinite(loss_sum) if scaled else ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if not self.every_step:
            self._first = torch.where((self._first < 0) & bad, torch.full_like(self._first, it), self._first)
            self._flag = torch.maximum(self._flag, bad.float())
            return False
        if all_max(bad.float(), self.dist).item() == 0:  # any rank's bad step is every rank's
            return False
        if self.policy == "stop":
            if math.isfinite(loss_sum.item()):
                raise self.error(it, "gradient", f" (grad norm {grad_norm.item():g})")
            raise self.error(it, "loss", f" (loss {loss_sum.item() / micro_batches:g})")
        return True

    def check_deferred(self) -> None:
        """Raise NonFiniteError for the first flagged iteration, if any (deferred checking only; a host sync
        and, with DDP, a collective: call it on every rank at the same points)."""
        if not self.every_step and all_max(self._flag.clone(), self.dist).item() > 0:
            raise self.error(int(self._first.item()), "loss or gradient")

    def check_skip_limit(self, it: int, skips: int) -> None:
        """Raise NonFiniteError when `skips` (the run's count, this skip at `it` included) passes the limit."""
        if skips > self.max_skips:
            raise self.error(it, "loss or gradient", f", skip {skips} of at most "
                             f"train.max_nonfinite_skips={self.max_skips}")


@dataclass
class StepParts:
    """What an optimizer step works on. `model` is what the forward runs (base_model, compiled and/or
    wrapped in DDP); the optimizer, GradScaler and clipping work on base_model's parameters."""

    model: torch.nn.Module
    base_model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    amp_dtype: torch.dtype
    amp: contextlib.AbstractContextManager  # autocast (or a no-op for float32), entered around each forward
    grad_clip: float  # 0: no clipping (the norm is still measured)
    device: torch.device
    ddp: bool = False
    params: list[torch.nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for p in self.base_model.parameters() if p.requires_grad]

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model to evaluate: compiled if training is, but never through DDP (rank 0 evaluates alone)."""
        return self.model.module if self.ddp else self.model


def build_step_parts(model: GPT, tc: TrainConfig, device: torch.device, d: Dist | None = None, *,
                     amp: tuple[torch.dtype, contextlib.AbstractContextManager] | None = None) -> StepParts:
    """StepParts for `model` (already on `device`) as tc trains it: the optimizer tc.optimizer names
    (optim.py; AdamW: nanoGPT's, fused where available, decay/no-decay groups), autocast per tc.dtype
    (`amp`: amp_context's result when already made), a GradScaler for float16, torch.compile when
    tc.compile, DDP when `d` has several ranks."""
    amp_dtype, amp_ctx = amp if amp is not None else amp_context(tc.dtype, device)
    optimizer = build_optimizer(model, tc, device.type)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    run_model: torch.nn.Module = torch.compile(model) if tc.compile else model
    ddp = d is not None and d.enabled
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run_model = DDP(run_model, device_ids=[device.index] if device.type == "cuda" else None)
    return StepParts(run_model, model, optimizer, scaler, amp_dtype, amp_ctx, tc.grad_clip, device, ddp)


@dataclass
class StepResult:
    """What a step leaves on the device for the log: reading it is a host sync."""

    loss_sum: torch.Tensor  # the sum of this rank's micro-batch losses
    micro_batches: int
    grad_norm: torch.Tensor  # the total gradient norm before clipping (of the unscaled gradient)
    skipped: bool  # dropped by train.nonfinite = "skip": the weights did not change

    def mean_loss(self, d: Dist | None = None) -> float:
        """The step's loss, averaged over micro-batches and ranks (with DDP a collective: all ranks call it)."""
        return all_mean(self.loss_sum / self.micro_batches, d or Dist()).item()


def train_step(parts: StepParts, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, it: int, lr: float,
               guard: NonFiniteGuard) -> StepResult:
    """One optimizer step at learning rate `lr` over this rank's micro-batches `batches` ((x, y) pairs on the
    device): the gradient of their mean loss (averaged over ranks by DDP), clipped to parts.grad_clip, then
    optimizer.step() (through the GradScaler for fp16) and zeroed gradients. guard judges the step first
    (`it` names it in errors): NonFiniteError, or a skipped step that leaves the weights unchanged."""
    model, scaler = parts.model, parts.scaler
    set_lr(parts.optimizer, lr)  # a group's lr_scale: Muon's rate moves with the schedule
    accum = len(batches)
    loss_sum = torch.zeros((), device=parts.device)
    for k, (x, y) in enumerate(batches):
        # DDP all-reduces gradients during backward(): only the last micro-batch's should
        sync_ctx = model.no_sync() if parts.ddp and k < accum - 1 else contextlib.nullcontext()
        with sync_ctx:
            with parts.amp:
                _, loss = model(x, y)
            loss_sum += loss.detach().float()
            loss = loss / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
    return finish_step(parts, loss_sum, accum, it=it, guard=guard)


def set_lr(optimizer, lr: float) -> None:
    """Every param group's rate for this step: lr, times the group's lr_scale (Muon's) where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def finish_step(parts: StepParts, loss_sum: torch.Tensor, accum: int, *, it: int,
                guard: NonFiniteGuard) -> StepResult:
    """The step after the backward passes left their gradients in parts.params: unscale (fp16), clip to
    parts.grad_clip and measure the norm, let `guard` judge the step, optimizer.step(), zero the gradients.
    An ensemble (training/ensemble.py) calls it once per member, on that member's parts."""
    optimizer, scaler = parts.optimizer, parts.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and measure the true gradient
    if parts.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parts.params, parts.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parts.params if p.grad is not None])
    skip = guard.should_skip(it, loss_sum, grad_norm, accum, scaled=scaler is not None)
    if not skip:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    return StepResult(loss_sum, accum, grad_norm, skip)
