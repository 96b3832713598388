"""Training data: the prepared dataset (tokenised once, by rank 0 first) and each step's micro-batches."""

from __future__ import annotations

import torch

from quietgpt.config import RunConfig, TrainConfig, apply_overrides
from quietgpt.data.sources import Dataset, check_length, get_batch, prepare
from quietgpt.training.distributed import Dist, rank0_first
from quietgpt.training.schedule import DATA_STREAM, derive_seed, generator

__all__ = ["TrainBatches", "model_vocab", "prepare_data"]


def model_vocab(dataset: Dataset) -> int:
    """The data's vocabulary size; GPT-2 BPE's 50257 is padded to a multiple of 64 (50304) for speed."""
    v = int(dataset.vocab_size)
    return -(-v // 64) * 64 if dataset.tokenizer.name == "gpt2" else v


def prepare_data(cfg: RunConfig, d: Dist) -> tuple[Dataset, RunConfig]:
    """cfg's dataset, ready on every rank, and cfg with model.vocab_size set to the data's. QuietError when
    the data cannot be read or is shorter than block_size + 1 tokens."""
    with rank0_first(d):  # rank 0 tokenises into the cache; the others then only read it
        dataset = prepare(cfg.data)
    cfg = apply_overrides(cfg, {"model.vocab_size": model_vocab(dataset)})
    check_length(dataset, cfg.model.block_size)
    return dataset, cfg


class TrainBatches:
    """This rank's micro-batches for each optimizer step, from one stream of random windows of the training
    tokens that every rank walks in full (the generator's state *is* the data position; it is saved in
    TrainState.rng["data"]).

    Of the gradient_accumulation_steps micro-batches of a global step, rank r keeps the consecutive share
    [r * k, (r + 1) * k) with k = gradient_accumulation_steps / world, so N ranks compute exactly the update
    one process computes with the same global batch (nanoGPT gives each rank its own seed instead, which
    makes the two incomparable).
    """

    def __init__(self, tokens, tc: TrainConfig, block_size: int, d: Dist, device: torch.device):
        self.tokens, self.block_size, self.device = tokens, block_size, device
        self.batch_size, self.global_micro = tc.batch_size, tc.gradient_accumulation_steps
        self.per_rank = tc.gradient_accumulation_steps // d.world
        self.first = d.rank * self.per_rank  # index of this rank's first micro-batch in a global step
        self.gen = generator(derive_seed(tc.seed, DATA_STREAM))  # the same global stream on every rank

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next step's (x, y) micro-batches of this rank, on its device; advances the stream by a
        whole global step."""
        mine = []
        for k in range(self.global_micro):
            keep = self.first <= k < self.first + self.per_rank
            # the other ranks' windows are drawn too (the stream must advance), but stay on the CPU
            x, y = get_batch(self.tokens, self.batch_size, self.block_size, self.gen, self.device if keep else "cpu")
            if keep:
                mine.append((x, y))
        return mine
