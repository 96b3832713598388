"""Perplexity passes: non-overlapping evaluation windows and the seeded draw of those observed for statistics,
the batch sizes every pass uses, a batched NLL pass (optionally observed by a collector on some windows), and
the seeded calibration batches quantization uses. measure() and the trajectories through training
(training/outliers.py) both take their windows and batch sizes from here, so "the same windows as the final
measurement" is one function, not a copy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def observed_windows(n_tokens: int, block_size: int, n: int, seed: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(every eval window of a split of n_tokens tokens, the indices of the n full block_size windows drawn with
    `seed` for the activation and attention statistics, ascending). Fewer when the split has fewer full
    windows; the tail window when it has none."""
    windows = eval_windows(n_tokens, block_size)
    full = [i for i, (_, length) in enumerate(windows) if length == block_size] or list(range(len(windows)))
    pick = np.random.default_rng(seed).choice(full, size=min(n, len(full)), replace=False)
    return windows, sorted(int(i) for i in pick)


@dataclass(frozen=True)
class BatchSizes:
    """Windows per forward pass: `plain` (hook-free), `observed` (on the reference path, materialising
    (B, H, T, T) probabilities) and `calib` (calibration batches)."""
    plain: int
    observed: int
    calib: int


def batch_sizes(block_size: int, vocab_size: int, n_head: int, *, batch: int = 16, calib: int = 8) -> BatchSizes:
    """`batch` and `calib` capped so one batch's (B, T, vocab) logits stay under 2^27 numbers and the observed
    batches' (B, H, T, T) probabilities under 2^24."""
    plain = max(1, min(batch, 2**27 // (block_size * vocab_size)))
    return BatchSizes(plain=plain, observed=max(1, min(plain, 2**24 // (n_head * block_size * block_size))),
                      calib=max(1, min(calib, 2**27 // (block_size * vocab_size))))


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


@dataclass
class Fidelity:
    """A quantized model against its float original over the same windows: the quantized NLL sum (nats),
    the sum over tokens of KL(P_fp || P_q) of the next-token distributions (nats), how many tokens keep the
    float model's top-1 prediction, and the token count."""
    nll: float = 0.0
    kl: float = 0.0
    top1_same: int = 0
    tokens: int = 0


@torch.no_grad()
def fidelity_pass(model: GPT, qmodel: GPT, tokens: np.ndarray, windows: Sequence[tuple[int, int]], *,
                  batch_size: int = 16, device: str | torch.device = "cpu",
                  q_device: str | torch.device | None = None) -> Fidelity:
    """Run the float `model` and the quantized `qmodel` side by side on `windows` of `tokens` (batches of
    equal-length windows, like nll_pass): the quantized NLL and its distance from the float predictions
    (llama.cpp's perplexity --kl-divergence: mean KL and "same top" share). q_device: where qmodel runs
    (default: device)."""
    out = Fidelity()
    order = sorted(range(len(windows)), key=lambda i: (windows[i][1], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) == batch_size or windows[cur[-1]][1] != windows[i][1]):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    for ids in batches:
        x, y = _batch(tokens, [windows[i] for i in ids], device)
        logp = torch.log_softmax(model(x)[0].float(), dim=-1).flatten(0, 1)
        xq = x.to(q_device) if q_device is not None else x
        logq = torch.log_softmax(qmodel(xq)[0].float(), dim=-1).flatten(0, 1).to(logp.device)
        out.nll += float(F.nll_loss(logq, y.reshape(-1), reduction="sum"))
        out.kl += float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
        out.top1_same += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        out.tokens += y.numel()
    return out


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
