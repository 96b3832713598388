"""What a training run reports, and when: metrics.jsonl, optional TensorBoard / W&B mirrors, the progress
printer, and the clock that splits training time from wall time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from quietgpt.config import RunConfig
from quietgpt.errors import QuietError
from quietgpt.training.state import TrainState
from quietgpt.utils.atomic import atomic_write_text
from quietgpt.utils.device import synchronize
from quietgpt.utils.progress import Progress

__all__ = ["Clock", "MetricsLog", "RunLog", "Trackers"]


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as rows come. On resume from the
    checkpoint after N steps, rows written after it (by a run that then died) are dropped first: all rows
    with iter > N, and the step rows with iter == N (eval and outlier rows at N came before the checkpoint).
    So the file reads as if the run had never stopped."""

    def __init__(self, path: Path, *, resume_from: int | None, enabled: bool):
        self.path, self.enabled, self._f = path, enabled, None
        if not enabled:
            return
        kept = []
        if resume_from is not None and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if not (isinstance(row, dict) and isinstance(row.get("iter"), int)):
                    continue
                before_save = "val_loss" in row or "outliers" in row  # written before the checkpoint at N
                if row["iter"] < resume_from or (row["iter"] == resume_from and before_save):
                    kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
        self._f = open(path, "a", encoding="utf-8")  # closed by close(): lives as long as the run

    def write(self, row: dict) -> None:
        """Append `row` as one line (keys sorted) and flush it; nothing when disabled."""
        if self._f is not None:
            self._f.write(json.dumps(row, sort_keys=True) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Trackers:
    """Optional TensorBoard / Weights & Biases mirrors of metrics.jsonl (only when installed and asked for)."""

    def __init__(self, cfg: RunConfig, out_dir: Path, enabled: bool):
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QuietError("train.tensorboard needs the tensorboard package; pip install tensorboard, "
                                 "or set train.tensorboard=false") from None
            self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if cfg.train.wandb:
            try:
                import wandb
            except ImportError:
                raise QuietError("train.wandb needs the wandb package; pip install wandb, or set "
                                 "train.wandb=false") from None
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=out_dir.name, config=cfg.to_dict())

    def log(self, row: dict) -> None:
        """Mirror a metrics row's numbers at step row["iter"]."""
        it = row["iter"]
        scalars = {k: v for k, v in row.items() if k != "iter" and isinstance(v, int | float)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, it)
        if self.wandb is not None:
            self.wandb.log(scalars, step=it)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class RunLog:
    """Where a run reports: metrics.jsonl rows, their TensorBoard / W&B mirrors, and the progress printer.
    Only rank 0 writes and prints (`master`); `progress` switches the printer. Make it once setup_run has
    succeeded: on resume it cuts metrics.jsonl back to the resume point (MetricsLog).

    Rows: evals {"iter", "train_loss", "val_loss"}, steps {"iter", "loss", "lr", "grad_norm",
    "tokens_per_s"}, outliers {"iter", "outliers": {metric key: value}, "outlier_s"} (training/outliers.py;
    mirrored to the trackers as "outliers/<key>"), skips {"iter", "nonfinite_skip"} (metrics.jsonl only).
    """

    def __init__(self, cfg: RunConfig, out: Path, *, start: int, resume: bool, master: bool, progress: bool):
        self.master = master
        self.trackers = Trackers(cfg, out, enabled=master)  # first: a missing optional package fails before any write
        self.metrics = MetricsLog(out / "metrics.jsonl", resume_from=start if resume else None, enabled=master)
        self.bar = Progress(cfg.train.max_iters, start, enabled=progress, desc="train", unit="it")

    def row(self, row: dict) -> None:
        """Write a row to metrics.jsonl and the trackers."""
        self.metrics.write(row)
        self.trackers.log(row)

    def evaluation(self, it: int, losses: dict[str, float]) -> None:
        """The eval of the state after `it` steps."""
        self.row({"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]})
        self.bar.note(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def outliers(self, it: int, values: dict[str, float], seconds: float) -> None:
        """The trajectory point of the state after `it` steps: registry metric values, measured in `seconds`."""
        self.metrics.write({"iter": it, "outliers": values, "outlier_s": seconds})
        self.trackers.log({"iter": it, **{f"outliers/{k}": v for k, v in values.items()}})

    def step(self, it: int, loss: float, lr: float, grad_norm: torch.Tensor | float, tok_s: float) -> None:
        """Step `it`'s numbers (rank 0; reading grad_norm waits for the device)."""
        if not self.master:
            return
        self.row({"iter": it, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s})
        self.bar.postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.line(f"iter {it}/{self.bar.total}: loss {loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, "
                      f"eta {self.bar.eta():,.0f}s")

    def skip(self, it: int, skips: int) -> None:
        """Step `it` was dropped as non-finite, the run's `skips`-th."""
        self.metrics.write({"iter": it, "nonfinite_skip": skips})

    def advance(self) -> None:
        """One more step taken (or skipped)."""
        self.bar.advance()

    def note(self, text: str) -> None:
        """A message for the user (above the bar, or a plain line)."""
        self.bar.note(text)

    def close(self) -> None:
        """Take the bar down, close metrics.jsonl and the trackers."""
        self.bar.close()
        self.metrics.close()
        self.trackers.close()


class Clock:
    """Training time (steps only: evals and checkpoints excluded) and wall time of a run, both summed over
    its sessions; tokens/s of the steps between two reads. Starts when made, just before the loop."""

    def __init__(self, state: TrainState, device: torch.device, tokens_per_step: int):
        self.start = time.perf_counter()
        self.prior_wall, self.device, self.tokens_per_step = state.wall_s, device, tokens_per_step
        self._mark, self._steps = self.start, 0

    def wall(self) -> float:
        """Wall seconds of the run so far, earlier sessions included."""
        return self.prior_wall + time.perf_counter() - self.start

    def step(self) -> None:
        """Count a step taken since the last mark."""
        self._steps += 1

    def pause(self, state: TrainState) -> None:
        """Stop counting training time (before an eval): waits for the device, adds the time since the last
        mark to state.train_time_s."""
        synchronize(self.device)
        state.train_time_s += time.perf_counter() - self._mark

    def resume(self) -> None:
        """Start counting training time again (after an eval)."""
        self._mark, self._steps = time.perf_counter(), 0

    def lap(self, state: TrainState) -> float:
        """Tokens/s of the steps since the last mark, whose time is added to state.train_time_s; marks now.
        Call it right after a host sync (reading the loss), so that the device's queue is in the time."""
        now = time.perf_counter()
        tok_s = self.tokens_per_step * self._steps / max(now - self._mark, 1e-9)
        state.train_time_s += now - self._mark
        self._mark, self._steps = now, 0
        return tok_s
