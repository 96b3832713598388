"""The report's figures: one function per PNG, each returning whether it had data to draw."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write

# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _colors(variants: Sequence[str]) -> dict[str, str]:
    return {v: f"C{i % 10}" for i, v in enumerate(variants)}


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)[:60] or "_"


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(buf.getvalue())

    atomic_write(path, write)


def _band(ax, xs_by_seed: list[dict], label: str, color: str) -> bool:
    """Mean over seeds (line) and min..max (band) of {x: y} curves; x values missing in a seed are skipped."""
    xs = sorted({x for c in xs_by_seed for x in c})
    if not xs:
        return False
    ys = [[c[x] for c in xs_by_seed if x in c] for x in xs]
    ax.plot(xs, [np.mean(y) for y in ys], color=color, label=label, marker="o" if len(xs) <= 24 else None,
            ms=3)
    if len(xs_by_seed) > 1:
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2, lw=0)
    return True


def plot_loss_curves(data: list[dict], variants: Sequence[str], out: Path) -> bool:
    plt = _plt()
    colors = _colors(variants)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for key, ax, title in (("loss", axes[0], "train loss (logged iterations)"),
                           ("val_loss", axes[1], "validation loss (eval iterations)")):
        for v in variants:
            curves = []
            for d in data:
                if d["variant"] != v:
                    continue
                c = {row["iter"]: float(row[key]) for row in d["log"]
                     if "iter" in row and isinstance(row.get(key), int | float) and math.isfinite(row[key])}
                if c:
                    curves.append(c)
            drawn |= _band(ax, curves, f"{v} (n={len(curves)})", colors[v])
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy (nats/token)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Loss curves: mean over seeds, band = min..max")
    if drawn:
        _save(fig, out)
    else:
        plt.close(fig)
    return drawn


def _per_layer(data: list[dict], variant: str, section: str, value, keep) -> list[dict]:
    """Per seed {layer: value(entries of that layer)} from each run's eval.json section."""
    curves = []
    for d in data:
        if d["variant"] != variant or not d["eval"]:
            continue
        by_layer: dict[int, list] = {}
        for e in d["eval"].get(section, []):
            if keep(e):
                by_layer.setdefault(int(e["layer"]), []).append(e)
        c = {}
        for layer, es in by_layer.items():
            y = value(es)
            if y is not None and math.isfinite(y):
                c[layer] = y
        if c:
            curves.append(c)
    return curves


def _finite_vals(es, key):
    return [float(e[key]) for e in es if isinstance(e.get(key), int | float) and math.isfinite(e[key])]


def _layer_axis(ax) -> None:
    """Integer layer ticks; log y (outliers span decades) with plain-number labels."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _plot_per_layer(data, variants, out: Path, section: str, keep, panels, suptitle: str, xlabel: str,
                    ylabel: str | None = None) -> bool:
    """Two side-by-side per-layer panels, one band (min..max over seeds around the mean) per variant.
    panels: [(entry key, aggregate over a layer's entries, title)]; keep selects the entries of `section`."""
    plt = _plt()
    colors = _colors(variants)
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    drawn = False
    for ax, (key, agg, title) in zip(axes, panels):
        for v in variants:
            curves = _per_layer(data, v, section,
                                lambda es, key=key, agg=agg: float(agg(_finite_vals(es, key)))
                                if _finite_vals(es, key) else None, keep)
            drawn |= _band(ax, curves, v, colors[v])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        _layer_axis(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(suptitle)
    if drawn:
        _save(fig, out)
    else:
        plt.close(fig)
    return drawn


def plot_weight_kurtosis(data, variants, out: Path, keep) -> bool:
    return _plot_per_layer(data, variants, out, "weights", keep,
                           [("kurtosis", max, "max over the layer's matmul weights"),
                            ("kurtosis", np.mean, "mean over the layer's matmul weights")],
                           "Weight kurtosis per layer (mean over seeds, band = min..max)", "layer",
                           "kurtosis (normal = 3)")


def plot_activations(data, variants, out: Path, keep) -> bool:
    return _plot_per_layer(data, variants, out, "activations", keep,
                           [("inf_norm_max", max, "infinity norm (max over sites)"),
                            ("kurtosis", np.mean, "kurtosis (mean over sites)")],
                           "Activations per layer (mean over seeds, band = min..max)", "layer (-1 = embeddings)")


def plot_unassigned_mass(data, variant: str, out: Path) -> bool:
    """Heatmap of unassigned attention mass (layer x head), mean over seeds."""
    cells: dict[tuple[int, int], list[float]] = {}
    for d in data:
        if d["variant"] != variant or not d["eval"]:
            continue
        for e in d["eval"].get("attention", []):
            u = e.get("unassigned_mass")
            if isinstance(u, int | float) and math.isfinite(u):
                cells.setdefault((int(e["layer"]), int(e["head"])), []).append(float(u))
    if not cells:
        return False
    n_layer = max(k[0] for k in cells) + 1
    n_head = max(k[1] for k in cells) + 1
    grid = np.full((n_layer, n_head), np.nan)
    for (layer, head), us in cells.items():
        grid[layer, head] = np.mean(us)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n_head, 1.0 + 0.55 * n_layer))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (layer, head), _ in cells.items():
        val = grid[layer, head]
        ax.text(head, layer, f"{val:.2f}", ha="center", va="center", fontsize=7,
                color="white" if val < 0.5 else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    fig.colorbar(im, ax=ax, label="unassigned mass")
    ax.set_title(f"{variant}: attention mass on nothing\n(mean over seeds and query positions)", fontsize=9)
    _save(fig, out)
    return True


def plot_quant_ppl(runs: Sequence[dict], variants, quant: Sequence[str], out: Path) -> bool:
    plt = _plt()
    colors = _colors(variants)
    configs = ["fp", *quant]
    keys = ["ppl", *[f"ppl_{q}" for q in quant]]
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        means, lows, highs = [], [], []
        for k in keys:
            vals = [r[k] for r in runs if r["variant"] == v and r.get("status") == "ok"
                    and isinstance(r.get(k), int | float) and math.isfinite(r[k])]
            means.append(np.mean(vals) if vals else np.nan)
            lows.append(min(vals) if vals else np.nan)
            highs.append(max(vals) if vals else np.nan)
        if all(np.isnan(means)):
            continue
        xs = np.arange(len(configs)) + (i - (len(variants) - 1) / 2) * width
        m = np.asarray(means)
        err = np.vstack([m - np.asarray(lows), np.asarray(highs) - m])
        ax.bar(xs, m, width, color=colors[v], label=v, yerr=err, capsize=2)
        drawn = True
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs)
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Perplexity, floating point vs quantized (mean over seeds, bars = min..max)", fontsize=10)
    if drawn:
        _save(fig, out)
    else:
        plt.close(fig)
    return drawn


def plot_attention_maps(data, variants, out: Path, max_heads: int = 4) -> bool:
    """Last layer's attention maps of one sample, first ok seed of each variant; rows = variants."""
    picks = []
    for v in variants:
        ds = sorted((d for d in data if d["variant"] == v and d["sample"] is not None), key=lambda d: d["seed"])
        if ds:
            picks.append((v, ds[0]["seed"], np.asarray(ds[0]["sample"], dtype=np.float64)))
    if not picks:
        return False
    plt = _plt()
    n_cols = min(max_heads, min(p[2].shape[1] for p in picks))
    fig, axes = plt.subplots(len(picks), n_cols, figsize=(2.4 * n_cols, 2.4 * len(picks)), squeeze=False)
    for row, (v, seed, probs) in enumerate(picks):
        layer = probs.shape[0] - 1
        for h in range(n_cols):
            ax = axes[row][h]
            p = probs[layer, h]
            ax.imshow(p, vmin=0.0, vmax=1.0, cmap="magma")
            unassigned = float(np.mean(1.0 - p.sum(-1)))
            ax.set_title(f"{v} s{seed} L{layer} H{h}\non nothing: {unassigned:.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Attention maps of one validation sample (rows: queries, columns: keys)", fontsize=10)
    _save(fig, out)
    return True


def _trajectory_curves(data: list[dict], variant: str, key: str) -> list[dict]:
    """Per seed of `variant` with any, {iteration: value of `key`} from its metrics.jsonl outlier rows."""
    curves = []
    for d in data:
        if d["variant"] != variant:
            continue
        c = {}
        for row in d["log"]:
            y = row.get("outliers", {}).get(key) if isinstance(row.get("outliers"), dict) else None
            if isinstance(row.get("iter"), int) and isinstance(y, int | float) and math.isfinite(y):
                c[row["iter"]] = float(y)
        if c:
            curves.append(c)
    return curves


def plot_trajectories(data: list[dict], variants: Sequence[str], metrics: Sequence[tuple[str, str]], out: Path,
                      thresholds: dict[str, float] | None = None) -> bool:
    """Outliers through training: one panel per (metric key, title) in `metrics`, one line per variant (mean
    over seeds, band = min..max) against the iteration, from the outlier rows of each run's metrics.jsonl
    ({"iter", "outliers": {key: value}}); a dashed line at a metric's emergence threshold. False (nothing
    written) when no run has a trajectory point."""
    colors = _colors(variants)
    curves = {(key, v): _trajectory_curves(data, v, key) for key, _ in metrics for v in variants}
    shown = [(key, title) for key, title in metrics if any(curves[key, v] for v in variants)]
    if not shown:
        return False
    plt = _plt()
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, shown):
        for v in variants:
            _band(ax, curves[key, v], v, colors[v])
        if thresholds and key in thresholds:
            ax.axhline(thresholds[key], color="0.4", ls="--", lw=1, label=f"threshold {thresholds[key]:g}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Outliers through training (fixed validation windows; mean over seeds, band = min..max)",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, out)
    return True
