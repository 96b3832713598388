"""Which outlier metric predicts the quantization damage? (Vlassis et al., ICLR 2026, "Beyond Outliers", find
that kurtosis and max/mean ratios fail to predict post-training-quantization damage across optimizers; this is
their test at a study's scale.)

For every outlier metric of the registry (PREDICTORS) and every quantization penalty the study measured
(ppl_ratio_<q>), over the study's finished runs:

    pooled  Spearman's rank correlation over all runs
    within  Spearman's correlation of the ranks taken within each arm (variant), pooled: does the metric
            order the seeds of one variant by their damage, with the variants' own levels taken out?

each with a 95% bootstrap interval (2000 resamples of runs, stratified by arm, seed 0; percentile
intervals). Over training, the same pooled correlation over every (run, iteration) point where a trajectory
measured both, the bootstrap resampling whole runs (500 resamples). A metric "predicts" a penalty when both
the pooled and the within interval exclude 0 with the same sign. A metric with fewer than MIN_DISTINCT distinct
values over the runs (a sink rate that is 0 in almost every run) is not ranked: its rank correlation would rest on
ties, and its resamples, mostly constant, would give intervals that need not even hold the estimate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps

BOOTSTRAP = 2000
MIN_DISTINCT = 5  # distinct values a metric and a penalty need over the runs to be rank-correlated
# outlier metrics (registry keys) that a study records per run; those a study lacks are skipped
PREDICTORS = ("weight_kurtosis_max", "weight_kurtosis_mean", "weight_max_abs", "wpe_kurtosis", "wpe_max_abs",
              "wte_kurtosis", "wte_max_abs", "act_inf_norm_max", "act_kurtosis_mean", "bondarenko_max_inf_norm",
              "bondarenko_avg_kurtosis", "massive_ratio_max", "act_max_first_token", "sink_rate",
              "first_token_argmax_share")
TRAJECTORY_PREDICTORS = ("weight_kurtosis_max", "act_inf_norm_max", "block_out_inf_norm_seq_mean_max",
                         "block_out_kurtosis_mean", "massive_ratio_max", "sink_rate", "first_token_mass_mean")


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (scipy), None with fewer than 3 points or a constant side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(sps.spearmanr(x, y).statistic)


def _rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b (NaN where a row is constant)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / den, np.nan)


def _rhos(xs: np.ndarray, ys: np.ndarray, blocks: list[slice]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of xs, ys (resamples x points, the points of each group contiguous in `blocks`): the pooled
    Spearman rho, and the rho of ranks taken within each group (centred) and pooled (groups < 2 left out)."""
    pooled = _rowwise_corr(sps.rankdata(xs, axis=1), sps.rankdata(ys, axis=1))
    wx, wy = [], []
    for b in blocks:
        n = b.stop - b.start
        if n >= 2:
            wx.append(sps.rankdata(xs[:, b], axis=1) - (n + 1) / 2)
            wy.append(sps.rankdata(ys[:, b], axis=1) - (n + 1) / 2)
    within = (_rowwise_corr(np.concatenate(wx, 1), np.concatenate(wy, 1)) if wx
              else np.full(len(xs), np.nan))
    return pooled, within


def _ci(vals: np.ndarray) -> list[float | None]:
    """The 2.5 and 97.5 percentiles of the finite bootstrap values; None when fewer than half are finite."""
    finite = vals[np.isfinite(vals)]
    if len(finite) < len(vals) / 2 or not len(finite):
        return [None, None]
    vals = finite
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def correlate(x: Sequence[float], y: Sequence[float], groups: Sequence[str], seed: int = 0) -> dict:
    """{n, pooled, pooled_ci, within, within_ci, predicts} for paired values x, y labelled by group: the
    statistics on the data, and percentile intervals over BOOTSTRAP resamples drawn within each group."""
    x, y, g = np.asarray(x, float), np.asarray(y, float), np.asarray(groups)
    distinct = min(len(np.unique(x)), len(np.unique(y)))
    if distinct < MIN_DISTINCT:
        return {"n": len(x), "pooled": None, "pooled_ci": [None, None], "within": None, "within_ci": [None, None],
                "predicts": False, "note": f"{distinct} distinct values"}
    order = np.argsort(g, kind="stable")
    x, y, g = x[order], y[order], g[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    blocks = [slice(a, b) for a, b in zip(starts, [*starts[1:], len(g)], strict=True)]
    (pooled,), (within,) = _rhos(x[None], y[None], blocks)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.integers(b.start, b.stop, (BOOTSTRAP, b.stop - b.start)) for b in blocks], axis=1)
    p_boot, w_boot = _rhos(x[idx], y[idx], blocks)
    p_ci, w_ci = _ci(p_boot), _ci(w_boot)
    signs = [np.sign(lo) for lo, hi in (p_ci, w_ci) if lo is not None and lo * hi > 0]
    return {"n": len(x), "pooled": None if np.isnan(pooled) else float(pooled), "pooled_ci": p_ci,
            "within": None if np.isnan(within) else float(within), "within_ci": w_ci,
            "predicts": bool(len(signs) == 2 and signs[0] == signs[1])}


def predictor_table(rows: Sequence[Mapping], penalties: Sequence[str]) -> dict:
    """{penalty: {metric: correlate(...)}} over the ok runs that have both values (arm = row["variant"])."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out: dict[str, dict] = {}
    for pen in penalties:
        table = {}
        for key in PREDICTORS:
            pts = [(r[key], r[pen], r["variant"]) for r in ok
                   if isinstance(r.get(key), int | float) and isinstance(r.get(pen), int | float)]
            if len(pts) >= 3:
                x, y, g = zip(*pts, strict=True)
                table[key] = correlate(x, y, g)
        out[pen] = table
    return out


def trajectory_table(trajs: Mapping[tuple[str, int], Mapping[str, Sequence[tuple[int, float]]]],
                     penalties: Sequence[str], seed: int = 0) -> dict:
    """{penalty: {metric: {n_points, n_runs, pooled, pooled_ci}}} over every (run, iteration) where both were
    measured; the bootstrap resamples whole runs (their points stay together)."""
    out: dict[str, dict] = {}
    for pen in penalties:
        table = {}
        for key in TRAJECTORY_PREDICTORS:
            runs = []
            for t in trajs.values():
                a, b = dict(t.get(key) or ()), dict(t.get(pen) or ())
                its = sorted(set(a) & set(b))
                if its:
                    runs.append((np.array([a[i] for i in its], float), np.array([b[i] for i in its], float)))
            if len(runs) < 2:
                continue
            x, y = np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])
            rng = np.random.default_rng(seed)
            vals = []
            for _ in range(BOOTSTRAP // 4):  # resamples of whole runs: their lengths differ, so one at a time
                pick = rng.integers(0, len(runs), len(runs))
                v = spearman(np.concatenate([runs[i][0] for i in pick]), np.concatenate([runs[i][1] for i in pick]))
                vals.append(np.nan if v is None else v)
            ci = _ci(np.array(vals))
            table[key] = {"n_points": len(x), "n_runs": len(runs), "pooled": spearman(x, y), "pooled_ci": ci}
        out[pen] = table
    return out
