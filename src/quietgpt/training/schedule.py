"""Pure functions of the config and the step: the learning-rate schedule and the seeds of the random streams."""

from __future__ import annotations

import math

import numpy as np
import torch

from quietgpt.config import TrainConfig

__all__ = ["DATA_STREAM", "DROPOUT_STREAM", "EVAL_STREAM", "derive_seed", "generator", "get_lr"]

# stream ids for derive_seed; the dropout stream of rank r is DROPOUT_STREAM + r, eval split i's EVAL_STREAM + i
DATA_STREAM, EVAL_STREAM, DROPOUT_STREAM = 1, 100, 1000


def get_lr(it: int, tc: TrainConfig) -> float:
    """nanoGPT's schedule: linear warmup over warmup_iters, cosine decay to min_lr at lr_decay_iters,
    min_lr after that. `it` is the 0-based step index."""
    if not tc.decay_lr:
        return tc.learning_rate
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / (tc.warmup_iters + 1)
    if it > tc.lr_decay_iters or tc.lr_decay_iters <= tc.warmup_iters:
        return tc.min_lr
    decay_ratio = (it - tc.warmup_iters) / (tc.lr_decay_iters - tc.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # runs 1 -> 0
    return tc.min_lr + coeff * (tc.learning_rate - tc.min_lr)


def derive_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for `stream` (model init, data, eval, dropout per rank) from the run seed."""
    state = np.random.SeedSequence(entropy=seed % 2**63, spawn_key=(stream,)).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed`: randomness that no other code draws from."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
