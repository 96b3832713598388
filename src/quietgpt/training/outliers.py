"""Outliers through training: the registry's cheap metrics, measured every train.outlier_interval steps.

Which metrics: every registry entry flagged `trajectory` (registry.trajectory_metrics: first-token and
unassigned attention mass, block-output inf-norm and kurtosis, activation inf-norm, weight kurtosis max, the
W8A8/W4A8 perplexity ratios, and whatever is flagged later). Each is computed by its own `Metric.value` from
an eval-shaped dict built with measure()'s pieces (weight_stats, a StatsCollector hooked through
model.observe, nll_pass, quantized), so a trajectory point and the final measurement share one definition.

On what: `outlier_sequences` full validation windows drawn once, the same draw as measure(seed=0,
n_sequences=outlier_sequences) over the whole validation split, whatever the run's seed or variant (a paired
design: every run is read on the same windows). The quantized ratios are perplexity on those same windows,
quantized over floating point, calibrated on `outlier_calib_batches` training batches from calibration_batches'
own seeded generator. So the last point is the final measurement's definition on fewer windows.

When: on the state after `it` steps for it % outlier_interval == 0, and after the last step (like evals);
the ratios too when it % (outlier_interval * outlier_quant_every) == 0, and at a last step off the interval
grid. A pure function of `it`: a resumed run measures the same points as an uninterrupted one.

Exactness: measurement draws from no stream training uses (numpy's own generator for the windows, a private
torch.Generator for calibration), runs in eval mode (no dropout draws) under no_grad, and quantized() puts
every weight back bit for bit; the model returns to the mode it was in. So training with trajectories is bit
for bit training without them (tests/test_trajectories.py).

Row in metrics.jsonl (rank 0): {"iter": it, "outliers": {key: value, ...}, "outlier_s": seconds}; a metric
with no value at that point (the ratios between quantized points) is left out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from quietgpt.config import TrainConfig
from quietgpt.measurement.collectors import StatsCollector, weight_stats
from quietgpt.measurement.perplexity import batch_sizes, calibration_batches, nll_pass, observed_windows, ppl_of
from quietgpt.measurement.registry import Metric, trajectory_metrics
from quietgpt.nn.model import GPT
from quietgpt.quant.simulated import quantized
from quietgpt.quant.spec import QuantConfig, parse_quant_list
from quietgpt.training.reporting import RunLog

__all__ = ["WINDOW_SEED", "OutlierTracker", "measure_outliers", "trajectory_windows"]

WINDOW_SEED = 0  # the study measures every run with seed 0 too (study/run.py): same draw, same windows


def trajectory_windows(n_tokens: int, block_size: int, n: int) -> list[tuple[int, int]]:
    """The (start, length) validation windows a trajectory reads: the windows measure(seed=0, n_sequences=n)
    observes (perplexity.observed_windows, the one draw both use), in split order."""
    windows, observed = observed_windows(n_tokens, block_size, n, WINDOW_SEED)
    return [windows[i] for i in observed]


@torch.no_grad()
def measure_outliers(model: GPT, val: np.ndarray, windows: Sequence[tuple[int, int]], metrics: dict[str, Metric],
                     *, configs: Sequence[QuantConfig] = (), calib: Sequence[torch.Tensor] = (),
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """{key: value} of `metrics` (registry entries, each by its own value()) for `model` on `windows` of the
    token array `val`: weight statistics, activation and attention statistics over every window, FP perplexity
    on them and, per quant config in `configs`, the quantized one calibrated on `calib` ((B, T) int64 batches).
    Metrics without a value here are left out. The model is left in the mode it was in, weights unchanged."""
    was_training = model.training
    model.eval()
    try:
        cfg = model.config
        T = max(n for _, n in windows)
        sizes = batch_sizes(T, cfg.vocab_size, cfg.n_head)  # measure()'s
        collector = StatsCollector()
        nll, ntok = nll_pass(model, val, windows, batch_size=sizes.plain, device=device,
                             observed=set(range(len(windows))), collector=collector, observe_batch=sizes.observed)
        perplexity = {"fp": ppl_of(nll, ntok), "tokens": ntok}
        for qc in configs:
            with quantized(model, qc, calib) as q:
                nll_q, _ = nll_pass(q.model, val, windows, batch_size=sizes.plain, device=device)
            perplexity[qc.name] = ppl_of(nll_q, ntok)
        ev = {"weights": weight_stats(model)[0], "activations": collector.activation_rows(),
              "attention": collector.attention_rows(), "perplexity": perplexity, **collector.papers()}
    finally:
        model.train(was_training)
    values = {k: m.value(ev) for k, m in metrics.items()}
    return {k: v for k, v in values.items() if v is not None}


class OutlierTracker:
    """Rank 0's trajectory measurements of a run (see the module docstring); measures nothing when
    train.outlier_interval is 0 or on other ranks. Call due(it) in the loop, then tracker(it)."""

    def __init__(self, model: GPT, dataset, tc: TrainConfig, block_size: int, device: torch.device, log: RunLog,
                 *, master: bool):
        self.model, self.val, self.device, self.log = model, dataset.val, device, log
        self.interval, self.every, self.max_iters = tc.outlier_interval, tc.outlier_quant_every, tc.max_iters
        self.enabled = master and self.interval > 0
        if not self.enabled:
            return
        T = min(block_size, model.config.block_size)
        self.windows = trajectory_windows(len(dataset.val), T, tc.outlier_sequences)
        self.configs = parse_quant_list(tc.outlier_quant) if self.every > 0 else []
        self.metrics = trajectory_metrics([c.name for c in self.configs])
        # calibration_batches draws from its own generator: the training stream is never touched
        calib_batch = batch_sizes(T, model.config.vocab_size, model.config.n_head).calib  # measure()'s
        self.calib = (calibration_batches(dataset.train, tc.outlier_calib_batches, calib_batch, T, WINDOW_SEED,
                                          device) if self.configs else [])

    def due(self, it: int) -> bool:
        """Is the state after `it` steps (it < max_iters) a trajectory point? (The last state always is.) The
        same answer on every rank: the loop's collectives around a point must match, though only rank 0 measures."""
        return self.interval > 0 and it % self.interval == 0

    def quant_due(self, it: int) -> bool:
        """Does the point after `it` steps also measure the quantized ratios?"""
        return bool(self.configs) and (it % (self.interval * self.every) == 0 or it % self.interval != 0)

    def __call__(self, it: int) -> dict[str, float]:
        """Measure the state after `it` steps and log its row; {} when disabled."""
        if not self.enabled:
            return {}
        t0 = time.perf_counter()
        values = measure_outliers(self.model, self.val, self.windows, self.metrics,
                                  configs=self.configs if self.quant_due(it) else (), calib=self.calib,
                                  device=self.device)
        self.log.outliers(it, values, time.perf_counter() - t0)
        return values
