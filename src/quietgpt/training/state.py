"""TrainState: everything a resume needs besides the model, optimizer and GradScaler state dicts, in one place.

The checkpoint (train_state.pt) stores TrainState.to_dict() at its top level next to "optimizer", "scaler",
"model", "config", "extras" and "format_version" (checkpoint.py's format; the keys predate this class, so
checkpoints written before it resume unchanged, and checkpoint.republish keeps reading "iter", "step_id" and
"best_step_id" from the same dict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from quietgpt.training.distributed import Dist
from quietgpt.training.schedule import DROPOUT_STREAM, derive_seed

__all__ = ["TrainState", "capture_rng", "restore_rng"]


@dataclass
class TrainState:
    """Where a run stands after `iter` optimizer steps. Every field is a plain Python value or a tensor, so
    the checkpoint holding it loads with torch.load(weights_only=True)."""

    iter: int = 0  # optimizer steps done (skipped non-finite steps included); the next step's index
    best_val_loss: float = math.inf  # the lowest val loss of an eval after step 0, the one best/ holds
    best_step_id: str | None = None  # step_id of the save that wrote best/ (checkpoint.republish uses it)
    step_id: str | None = None  # id of the save that wrote this state (and the weights published with it)
    nonfinite_skips: int = 0  # steps dropped by train.nonfinite = "skip"
    tokens: int = 0  # training tokens consumed by steps taken, all ranks
    train_time_s: float = 0.0  # seconds in training steps (evals and checkpoints excluded), all sessions
    wall_s: float = 0.0  # wall seconds of the run at the last save, all sessions
    last_losses: dict[str, float] = field(default_factory=dict)  # the latest eval: {"train": .., "val": ..}
    # {"torch": CPU RNG, "data": the training stream's generator, "cuda": CUDA RNG or an empty tensor},
    # as of the last save (capture_rng)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    world_size: int = 1  # processes of the session that saved: informational, a resume may use another count
    seed: int = 0  # train.seed of the session that saved: informational

    def to_dict(self) -> dict:
        """The fields as train_state.pt stores them (a new dict; tensors are shared, not copied)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(last_losses=dict(self.last_losses), rng=dict(self.rng))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        """The state in a train_state dict (checkpoint.load_train_state's result; other keys are ignored).
        Entries that older checkpoints lack take their defaults; KeyError without "iter" or "best_val_loss",
        ValueError/TypeError on entries of the wrong type."""
        known = {f.name for f in fields(cls)}
        st = cls(**{k: v for k, v in d.items() if k in known})
        st.iter, st.best_val_loss = int(d["iter"]), float(d["best_val_loss"])
        st.nonfinite_skips, st.tokens = int(st.nonfinite_skips), int(st.tokens)
        st.train_time_s, st.wall_s = float(st.train_time_s), float(st.wall_s)
        st.last_losses = dict(st.last_losses or {})
        st.rng = dict(st.rng)
        return st


def capture_rng(data_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random states as TrainState.rng stores them: the global CPU RNG (dropout), the
    training stream's generator, and the CUDA RNG on CUDA (an empty tensor elsewhere)."""
    return {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0)}


def restore_rng(rng: dict[str, torch.Tensor], data_gen: torch.Generator, device: torch.device, d: Dist,
                seed: int, iteration: int) -> None:
    """Continue the random streams of a run saved after `iteration` steps: the data stream on every rank
    (one global stream), rank 0's dropout RNG as saved. Raises KeyError/RuntimeError/TypeError when `rng`
    does not fit this run."""
    data_gen.set_state(rng["data"])
    if d.master:
        torch.set_rng_state(rng["torch"])
        cuda_rng = rng.get("cuda")
        if device.type == "cuda" and cuda_rng is not None and cuda_rng.numel() > 0:
            torch.cuda.set_rng_state(cuda_rng, device)  # absent when the checkpoint came from a CPU run
    else:  # other ranks' dropout streams are not saved: re-derive them from the resume point
        torch.manual_seed(derive_seed(seed, DROPOUT_STREAM + d.rank) + int(iteration))
