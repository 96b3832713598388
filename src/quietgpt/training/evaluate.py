"""Evaluation during training: the mean train and val loss over fixed batches, and its metrics row."""

from __future__ import annotations

import contextlib

import torch

from quietgpt.config import TrainConfig
from quietgpt.data.sources import Dataset, get_batch
from quietgpt.training.reporting import RunLog
from quietgpt.training.schedule import EVAL_STREAM, derive_seed, generator

__all__ = ["Evaluator", "estimate_loss"]


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, dataset: Dataset, tc: TrainConfig, block_size: int,
                  device: torch.device, amp: contextlib.AbstractContextManager) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split, {"train": .., "val": ..}. The batches come from
    generators seeded by (seed, split) alone: every eval of a run, and every run with this seed, scores
    the same windows, and the training stream is never touched."""
    was_training = model.training
    model.eval()
    out = {}
    for i, split in enumerate(("train", "val")):
        gen = generator(derive_seed(tc.seed, EVAL_STREAM + i))
        tokens = getattr(dataset, split)
        total = torch.zeros((), device=device)
        for _ in range(tc.eval_iters):
            x, y = get_batch(tokens, tc.batch_size, block_size, gen, device)
            with amp:
                _, loss = model(x, y)
            total += loss.float()
        out[split] = total.item() / tc.eval_iters
    model.train(was_training)
    return out


class Evaluator:
    """Evaluates the model on rank 0 (the other ranks wait at the next collective) and logs the result."""

    def __init__(self, model: torch.nn.Module, dataset: Dataset, tc: TrainConfig, block_size: int,
                 device: torch.device, amp: contextlib.AbstractContextManager, log: RunLog, *, master: bool):
        self.model, self.dataset, self.tc, self.block_size = model, dataset, tc, block_size
        self.device, self.amp, self.log, self.master = device, amp, log, master

    def __call__(self, it: int) -> dict[str, float]:
        """estimate_loss of the state after `it` steps, written to the log; {} on ranks other than 0."""
        if not self.master:
            return {}
        losses = estimate_loss(self.model, self.dataset, self.tc, self.block_size, self.device, self.amp)
        self.log.evaluation(it, losses)
        return losses
