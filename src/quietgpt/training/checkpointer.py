"""When and what training saves: the checkpoint after an eval, the best one, and which one survives."""

from __future__ import annotations

import uuid
from pathlib import Path

from quietgpt.config import RunConfig
from quietgpt.runs import checkpoint as ckpt
from quietgpt.training.batches import TrainBatches
from quietgpt.training.reporting import Clock
from quietgpt.training.state import TrainState, capture_rng
from quietgpt.training.step import StepParts

__all__ = ["Checkpointer", "has_checkpoint"]


def has_checkpoint(out: Path) -> bool:
    """Does `out` hold a resume point or published weights (which a fresh run must not overwrite)?"""
    return (out / ckpt.STATE).exists() or (out / ckpt.WEIGHTS).exists()


class Checkpointer:
    """Rank 0's saves into the run folder `out`. A save writes train_state.pt (TrainState.to_dict() plus the
    optimizer and GradScaler state dicts; checkpoint.save_checkpoint adds the weights and the config), then
    the published model.safetensors + config.json, then best/ when the save is the best so far.

    That order is what makes a crash anywhere harmless: until train_state.pt lands the previous resume point
    stands; after it, resuming repairs the published files from it (checkpoint.republish), which knows from
    best_step_id whether this save was also the best. Other ranks' Checkpointer does nothing.
    """

    def __init__(self, out: Path, cfg: RunConfig, extras: dict, parts: StepParts, batches: TrainBatches,
                 clock: Clock, *, master: bool, last_saved: int | None):
        self.out, self.cfg, self.extras, self.parts, self.batches = out, cfg, extras, parts, batches
        self.clock, self.master, self.last_saved = clock, master, last_saved

    def after_eval(self, state: TrainState, *, final: bool = False) -> None:
        """After the eval of the state after state.iter steps (its losses in state.last_losses): track the
        best val loss and save when it improved, when train.always_save_checkpoint, or when `final`. The
        state after 0 steps is never saved (except as a final one), so it is not the best either."""
        if not self.master or (state.iter == 0 and not final):
            return
        val = state.last_losses["val"]
        improved = val < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, val)
        if improved or final or self.cfg.train.always_save_checkpoint:
            self.save(state, best=improved)

    def save(self, state: TrainState, *, best: bool) -> None:
        """Save `state` (stamped first with this save's step id, the RNG states now and the wall time) with
        the model, optimizer and GradScaler; with best=True also as best/."""
        if not self.master:
            return
        sid = uuid.uuid4().hex
        state.step_id = sid
        if best:
            state.best_step_id = sid
        state.rng = capture_rng(self.batches.gen, self.parts.device)
        state.wall_s = self.clock.wall()
        optimizer, scaler = self.parts.optimizer, self.parts.scaler
        saved = {**state.to_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else {}}
        model = self.parts.base_model
        ckpt.save_checkpoint(self.out, model, self.cfg, saved, extras=self.extras)
        if best:
            ckpt.save_checkpoint(self.out, model, self.cfg, {"iter": state.iter, "step_id": sid}, best=True,
                                 extras=self.extras)
        self.last_saved = state.iter

    def kept(self) -> str:
        """What survives a failure now, for error messages."""
        if self.last_saved is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint (iteration {self.last_saved}) in {self.out} is kept"
