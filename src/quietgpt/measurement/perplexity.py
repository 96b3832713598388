"""Perplexity passes: non-overlapping evaluation windows, a batched NLL pass (optionally observed by a
collector on some windows), and the seeded calibration batches quantization uses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from quietgpt.errors import QuietError
from quietgpt.measurement.collectors import StatsCollector
from quietgpt.nn.model import GPT

Tensor = torch.Tensor


def eval_windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) windows covering a split of n_tokens tokens: every token after
    the first is predicted exactly once. Full block_size windows, then one shorter tail window."""
    n_pred = n_tokens - 1
    full = n_pred // block_size
    out = [(i * block_size, block_size) for i in range(full)]
    if n_pred - full * block_size > 0:
        out.append((full * block_size, n_pred - full * block_size))
    return out


def _batch(tokens: np.ndarray, windows: Sequence[tuple[int, int]], device) -> tuple[Tensor, Tensor]:
    x = np.stack([np.asarray(tokens[s:s + n]) for s, n in windows]).astype(np.int64)
    y = np.stack([np.asarray(tokens[s + 1:s + 1 + n]) for s, n in windows]).astype(np.int64)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


@torch.no_grad()
def nll_pass(model: GPT, tokens: np.ndarray, windows: Sequence[tuple[int, int]], *, batch_size: int = 16,
             device: str | torch.device = "cpu", observed: set[int] = frozenset(),
             collector: StatsCollector | None = None, observe_batch: int | None = None) -> tuple[float, int]:
    """Sum of token NLLs (nats, float64) and the token count over `windows` of `tokens`.

    Windows whose index is in `observed` run in their own batches (of at most `observe_batch`) with
    `collector` hooked to every observation site; the rest run hook-free on the fast path."""
    total, count = 0.0, 0
    groups: list[tuple[list[int], bool]] = []
    plain = [i for i in range(len(windows)) if i not in observed]
    obs = [i for i in range(len(windows)) if i in observed]
    for ids, is_obs, bs in ((plain, False, batch_size), (obs, True, observe_batch or batch_size)):
        cur: list[int] = []
        for i in ids:  # batches of equal-length windows
            if cur and (len(cur) == bs or windows[cur[-1]][1] != windows[i][1]):
                groups.append((cur, is_obs))
                cur = []
            cur.append(i)
        if cur:
            groups.append((cur, is_obs))
    for ids, is_obs in groups:
        x, y = _batch(tokens, [windows[i] for i in ids], device)
        if is_obs and collector is not None:
            collector.tokens = x
            with model.observe(collector):
                logits, _ = model(x)
        else:
            logits, _ = model(x)
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return total, count


def ppl_of(nll: float, n: int) -> float:
    return math.exp(nll / n) if n else float("nan")


def calibration_batches(train: np.ndarray, n: int, batch_size: int, block_size: int, seed: int,
                         device) -> list[Tensor]:
    """n seeded (batch_size, block_size) int64 batches of random contiguous windows of `train`."""
    T = min(block_size, len(train) - 1)
    if T < 1:
        raise QuietError("the training split is too short to calibrate quantization; prepare more data")
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(train) - T, (batch_size,), generator=g).tolist()
        out.append(torch.from_numpy(np.stack([np.asarray(train[s:s + T]) for s in starts]).astype(np.int64)).to(device))
    return out
