"""The report's figures: one function per PNG, each returning whether it had data to draw."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quietgpt.report.cells import ZERO_TOL
from quietgpt.stats import fmt
from quietgpt.utils.atomic import atomic_write

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


def _mass_grid(data, variant: str) -> np.ndarray | None:
    """(n_layer, n_head) unassigned mass of one variant, mean over seeds; None without data."""
    cells: dict[tuple[int, int], list[float]] = {}
    for d in data:
        if d["variant"] != variant or not d["eval"]:
            continue
        for e in d["eval"].get("attention", []):
            u = e.get("unassigned_mass")
            if isinstance(u, int | float) and math.isfinite(u):
                cells.setdefault((int(e["layer"]), int(e["head"])), []).append(float(u))
    if not cells:
        return None
    grid = np.full((max(k[0] for k in cells) + 1, max(k[1] for k in cells) + 1), np.nan)
    for (layer, head), us in cells.items():
        grid[layer, head] = np.mean(us)
    return grid


def mass_norm(lo: float, hi: float):
    """(matplotlib norm, colormap name) of the unassigned-mass heatmaps for data spanning lo..hi: diverging
    around 0 when some head over-assigns (lo < 0), logarithmic when positive values span more than a
    decade, else linear lo..hi."""
    from matplotlib.colors import LogNorm, Normalize

    if lo < 0:  # clipped with zeta > 1 can over-assign a row
        top = max(abs(lo), hi, 1e-12)
        return Normalize(-top, top), "RdBu_r"
    if lo > 0 and hi / lo > 10:
        return LogNorm(lo, hi), "viridis"
    return Normalize(lo, hi if hi > lo else lo + 1e-12), "viridis"


def plot_unassigned_mass(data, variants: Sequence[str], out: Path) -> bool:
    """Heatmaps (layer x head, mean over seeds and query positions) of the unassigned attention mass of
    `variants`, side by side on ONE colour scale taken from the data, so the panels compare: min..max,
    logarithmic when the values are positive and span more than a decade (softmax1 at 0.03 next to
    clipped at 0.8 would otherwise paint every softmax1 cell alike), symmetric around 0 when some head
    over-assigns. Every cell also prints its value."""
    grids = [(v, g) for v in variants if (g := _mass_grid(data, v)) is not None]
    if not grids:
        return False
    from matplotlib.colors import LogNorm

    norm, cmap = mass_norm(min(float(np.nanmin(g)) for _, g in grids), max(float(np.nanmax(g)) for _, g in grids))
    plt = _plt()
    n_head = max(g.shape[1] for _, g in grids)
    n_layer = max(g.shape[0] for _, g in grids)
    fig, axes = plt.subplots(1, len(grids), figsize=(0.6 + (0.55 * n_head + 0.6) * len(grids) + 1.2,
                                                     1.3 + 0.45 * n_layer), squeeze=False)
    for ax, (v, g) in zip(axes[0], grids, strict=True):
        im = ax.imshow(g, norm=norm, cmap=cmap, aspect="auto")
        for (layer, head), val in np.ndenumerate(g):
            if math.isfinite(val):
                dark = norm(val) < 0.5 if cmap == "viridis" else abs(norm(val) - 0.5) > 0.3
                ax.text(head, layer, f"{val:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        ax.set_title(v, fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(g.shape[1]))
        ax.set_yticks(range(g.shape[0]))
    axes[0][0].set_ylabel("layer")
    scale = "log scale, " if isinstance(norm, LogNorm) else ""
    fig.colorbar(im, ax=list(axes[0]), label=f"unassigned mass ({scale}shared)", shrink=0.9)
    fig.suptitle("Attention mass on nothing (1 - row sum), mean over seeds and query positions", fontsize=9)
    _save(fig, out)
    return True


def _seed_values(runs: Sequence[dict], v: str, fn) -> list[float]:
    vals = []
    for r in runs:
        if r["variant"] == v and r.get("status") == "ok":
            x = fn(r)
            if x is not None and math.isfinite(x):
                vals.append(float(x))
    return vals


def plot_quant_ppl(runs: Sequence[dict], variants, quant: Sequence[str], out: Path) -> bool:
    """Left: perplexity per config (FP and each quant config), y-axis from 0, so a 0.5% gap looks like
    one. Right: the quantization penalty (ppl_q / ppl_fp - 1) in percent per config, bars from 0, one dot
    per seed: the number the left panel cannot show."""
    plt = _plt()
    colors = _colors(variants)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    width = 0.8 / max(1, len(variants))

    def num(r: dict, k: str) -> float | None:
        x = r.get(k)
        return float(x) if isinstance(x, int | float) else None

    for i, v in enumerate(variants):
        off = (i - (len(variants) - 1) / 2) * width
        ppl = [_seed_values(runs, v, lambda r, k=k: num(r, k)) for k in ["ppl", *[f"ppl_{q}" for q in quant]]]
        pen = [_seed_values(runs, v, lambda r, q=q: None if not (num(r, "ppl") and num(r, f"ppl_{q}"))
                            else (num(r, f"ppl_{q}") / num(r, "ppl") - 1) * 100) for q in quant]
        if not any(ppl):
            continue
        drawn = True
        ax.bar(np.arange(len(ppl)) + off, [np.mean(x) if x else np.nan for x in ppl], width, color=colors[v],
               label=v)
        ax2.bar(np.arange(len(pen)) + off, [np.mean(x) if x else np.nan for x in pen], width, color=colors[v],
                alpha=0.6, label=v)
        for j, x in enumerate(pen):
            ax2.plot([j + off] * len(x), x, "o", color="black", ms=2.5)
    ax.set_xticks(range(len(quant) + 1))
    ax.set_xticklabels(["fp", *quant])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # from 0, with room for the legend above the bars
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity (mean over seeds; y from 0)", fontsize=10)
    ax.legend(fontsize=8, ncol=max(1, len(variants)), loc="upper center")
    ax2.set_xticks(range(len(quant)))
    ax2.set_xticklabels(list(quant))
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_ylabel("penalty: % perplexity over FP")
    ax2.set_title("Quantization penalty (bar = mean, dots = seeds)" if quant else "no quantization sweep",
                  fontsize=10)
    if drawn:
        _save(fig, out)
    else:
        plt.close(fig)
    return drawn


def plot_attention_maps(data, variants, out: Path, context: int | None = None, max_heads: int = 4) -> bool:
    """Last layer's attention maps of one sample, first ok seed of each variant; rows = variants. The
    sample holds the first T positions of a validation sequence (study.run.attention_sample); the title
    says T and, when known, the model's context."""
    picks = []
    for v in variants:
        ds = sorted((d for d in data if d["variant"] == v and d["sample"] is not None), key=lambda d: d["seed"])
        if ds:
            picks.append((v, ds[0]["seed"], np.asarray(ds[0]["sample"], dtype=np.float64)))
    if not picks:
        return False
    plt = _plt()
    n_cols = min(max_heads, min(p[2].shape[1] for p in picks))
    from matplotlib.colors import PowerNorm

    fig, axes = plt.subplots(len(picks), n_cols, figsize=(2.4 * n_cols + 0.8, 2.4 * len(picks) + 0.4),
                             squeeze=False, layout="constrained")
    for row, (v, seed, probs) in enumerate(picks):
        layer = probs.shape[0] - 1
        for h in range(n_cols):
            ax = axes[row][h]
            p = probs[layer, h]
            # square-root colour scale: most weights of a 32-key row are small; 0..1 linear paints them black
            im = ax.imshow(p, norm=PowerNorm(0.5, 0.0, 1.0), cmap="magma")
            unassigned = float(np.mean(1.0 - p.sum(-1)))
            unassigned = 0.0 if abs(unassigned) < ZERO_TOL else unassigned  # float rounding of a row sum
            ax.set_title(f"{v} s{seed} L{layer} H{h}\non nothing: {unassigned:.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    t = picks[0][2].shape[-1]
    of = f" of the model's {context}" if context and context > t else ""
    fig.suptitle(f"Attention maps of one validation sample: the first {t} positions{of}, last layer\n"
                 "(rows: queries, columns: keys)", fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="attention weight (square-root scale)", shrink=0.6)
    _save(fig, out)
    return True


def plot_forest(panels: Sequence[dict], out: Path, baseline: str) -> bool:
    """The report's first figure: one panel per headline metric, one row per variant, the paired
    difference to the baseline (point) with its 95% interval (line). panels: [{"title", "xlabel",
    "rows": [{"label", "x", "lo", "hi", "kind" (cells.symbol_key), "judged" ("better"|"worse"|None)}]}].
    Holm-significant differences are filled and starred; leads (interval excludes 0 only before the
    correction) hollow in colour; the rest hollow grey."""
    panels = [p for p in panels if any(r["x"] is not None for r in p["rows"])]
    if not panels:
        return False
    plt = _plt()
    n_cols = min(4, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    n_var = max(len(p["rows"]) for p in panels)
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(11, n_rows * (0.85 + 0.26 * n_var) + 0.3),
                             squeeze=False, layout="constrained")
    tone = {"better": "#1a7f37", "worse": "#c62828", None: "black"}
    for ax, p in zip(axes.ravel(), panels):
        rows = p["rows"]
        for y, r in enumerate(rows):
            if r["x"] is None:
                continue
            sig = r["kind"] in ("up", "down")
            lead = r["kind"] in ("lead_up", "lead_down")
            c = tone[r["judged"]] if sig or lead else "#888888"
            if r["lo"] is not None:
                ax.plot([r["lo"], r["hi"]], [y, y], color=c, lw=1.6)
            ax.plot([r["x"]], [y], "o", ms=6, color=c, mfc=c if sig else "white", mew=1.4)
            if sig:
                ax.annotate("*", (r["x"], y), xytext=(0, 3), textcoords="offset points", ha="center",
                            fontsize=11, color=c)
        ax.axvline(0, color="black", lw=0.8, ls="--")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["label"] for r in rows], fontsize=8.5)
        ax.set_ylim(len(rows) - 0.5, -0.6)
        ax.set_title(p["title"], fontsize=9)
        ax.set_xlabel(p["xlabel"], fontsize=8)
        ax.tick_params(axis="x", labelsize=7.5)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt(x, 2)))  # no offset text over the label
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Paired difference to {baseline} (variant - {baseline}), 95% interval. Filled *: significant "
                 "after Holm; hollow colour: interval excludes 0 but not after Holm; grey: includes 0. "
                 "Green better, red worse.", fontsize=9)
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


def plot_sensitivity(arms: dict[str, dict[str, dict]], groups: Sequence[str], variants: Sequence[str], out: Path,
                     title: str) -> bool:
    """Heat map of each variant's (rows) mean penalty, in percent over FP, with one tensor group (columns)
    quantized alone; the numbers written in the cells. False (nothing drawn) without data."""
    rows = [v for v in variants if arms.get(v)]
    if not rows or not groups:
        return False
    plt = _plt()
    vals = np.array([[((arms[v].get(g) or {}).get("mean", np.nan) - 1.0) * 100 for g in groups] for v in rows])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) + 2), 0.55 * len(rows) + 2.2))
    finite = vals[np.isfinite(vals)]
    top = float(np.max(np.abs(finite))) if finite.size else 1.0
    decimals = max(0, 1 - math.floor(math.log10(top))) if top > 0 else 1  # two significant digits at the top
    im = ax.imshow(vals, cmap="Reds", vmin=0.0, vmax=max(top, 1e-6), aspect="auto")
    ax.set_xticks(range(len(groups)), groups, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(groups)):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.{decimals}f}", ha="center", va="center", fontsize=6,
                        color="white" if vals[i, j] > 0.6 * top else "black")
    fig.colorbar(im, ax=ax, label="penalty with only this group quantized (% perplexity over FP)")
    ax.set_title(title, fontsize=9)
    _save(fig, out)
    return True
