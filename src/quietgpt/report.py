"""A study's report: report.md, a self-contained report.html, and plots/*.png, from results on disk.

`write_report(study_dir)` reads results.json (runs, summary, comparisons, config; see study.py) and each
run's folder (metrics.jsonl, eval.json, attn_sample.npz) and writes:

    plots/loss_curves.png            train and val loss per variant: mean over seeds, band = min..max
    plots/weight_kurtosis.png        per-layer kurtosis of the block matmul weights
    plots/activations.png            per-layer activation infinity norm and kurtosis
    plots/unassigned_mass_<v>.png    attention mass left on "nothing", layer x head, one per null variant
    plots/quant_ppl.png              perplexity in floating point and across the quantization sweep
    plots/attention_maps.png         one sample's attention maps in the last layer, per variant
    report.md, report.html           question, setup, summary, comparisons with verdicts, plots, failures

Nothing is trained or measured here, so `quietgpt report DIR` can rebuild everything at any time. The
HTML embeds the PNGs as base64 data URIs, has no external CSS or JS (works offline and as an email
attachment), and every string that came from data or configs goes through html.escape.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_write, atomic_write_text
from .attention import NULL_VARIANTS  # the variants that can leave attention mass on "nothing"
from .errors import QuietError
from .registry import ACT_SITES, ACTIVATIONS, BLOCK_WEIGHTS
from .stats import fmt

QUESTION = ("Does softmax1 attention (exp(x_i) / (1 + sum_j exp(x_j)), \"quiet attention\") remove the outlier "
            "weights and activations that make transformers hard to quantize, and what does it do to quality "
            "and to low-bit quantization?")


# ----------------------------------------------------------------------------- reading a study


def load_results(study_dir: str | Path) -> dict:
    """results.json as a dict; QuietError (one line) when it is missing or not valid JSON."""
    path = Path(study_dir) / "results.json"
    if not path.is_file():
        raise QuietError(f"{path} does not exist; run `quietgpt study --out {study_dir}` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuietError(f"{path} is not valid JSON ({e}); rerun the study to rewrite it") from None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
    except OSError:
        pass
    return rows


def _run_data(study_dir: Path, runs: Sequence[dict]) -> list[dict]:
    """The ok runs with their eval.json, metrics.jsonl and attention sample loaded (missing pieces None)."""
    out = []
    for r in runs:
        if r.get("status") != "ok" or not r.get("dir"):
            continue
        d = study_dir / r["dir"]
        sample = None
        if (d / "attn_sample.npz").is_file():
            try:
                with np.load(d / "attn_sample.npz") as z:
                    sample = z["probs"]
            except (OSError, ValueError, KeyError):
                sample = None
        out.append({"variant": r["variant"], "seed": r["seed"], "eval": _read_json(d / "eval.json"),
                    "log": _read_jsonl(d / "metrics.jsonl"), "sample": sample})
    return out


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _colors(variants: Sequence[str]) -> dict[str, str]:
    return {v: f"C{i % 10}" for i, v in enumerate(variants)}


def _safe_name(s: str) -> str:
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


# ----------------------------------------------------------------------------- the document


def _cell_ci(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    if s.get("ci95_low") is None:
        return f"{fmt(s['mean'])} (n={s['n']}, no CI)"
    d = 3  # enough significant digits to tell the interval's ends apart (ratios near 1 need more)
    while d < 6 and s["ci95_low"] != s["ci95_high"] and fmt(s["ci95_low"], d) == fmt(s["ci95_high"], d):
        d += 1
    return f"{fmt(s['mean'], d)} [{fmt(s['ci95_low'], d)}, {fmt(s['ci95_high'], d)}]"


def build_document(results: dict, plots: list[tuple[str, str]]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("ul", [items]), ("table", header, rows),
    ("img", relative path, caption). Rendered to Markdown and HTML by the functions below."""
    cfg = results.get("config", {})
    run_cfg = cfg.get("run", {})
    variants = cfg.get("variants", [])
    metrics = results.get("metrics", {})
    machine = results.get("machine", {})
    runs = results.get("runs", [])
    n_ok = sum(r.get("status") == "ok" for r in runs)
    model = run_cfg.get("model", {})
    train = run_cfg.get("train", {})
    irreducible = [r["irreducible_loss"] for r in runs if isinstance(r.get("irreducible_loss"), int | float)]
    blocks: list[tuple] = [("h1", f"quietgpt study: {cfg.get('preset', '?')}")]
    blocks += [("h2", "Question"), ("p", QUESTION)]
    blocks += [("h2", "Setup"), ("ul", [
        f"study preset: {cfg.get('preset')} (training preset {cfg.get('train_preset')}); "
        f"overrides: {', '.join(f'{k}={v}' for k, v in sorted(cfg.get('overrides', {}).items())) or 'none'}",
        f"variants: {', '.join(variants)}; baseline: {cfg.get('baseline')}",
        f"seeds: {', '.join(str(s) for s in cfg.get('seeds', []))} (paired design: for each seed every variant "
        "starts from the same shared initial weights and sees the same batches in the same order)",
        f"data: {run_cfg.get('data', {}).get('source')} (tokenizer {run_cfg.get('data', {}).get('tokenizer')})"
        + (f"; irreducible loss of the synthetic task {fmt(irreducible[0])} nats/token (a lower bound "
           "for the validation loss; a model that sees only its context window cannot quite reach it)"
           if irreducible else ""),
        f"model: {model.get('n_layer')} layers, {model.get('n_head')} heads, {model.get('n_embd')} wide, "
        f"context {model.get('block_size')}; training: {train.get('max_iters')} iterations of batch "
        f"{train.get('batch_size')}, lr {train.get('learning_rate')}",
        "measurement (metrics.measure, the same for every run): perplexity on "
        + (f"the first {cfg['eval_tokens']} tokens of the validation split; " if cfg.get("eval_tokens")
           else "the whole validation split; ")
        + f"activation and attention statistics on {cfg.get('n_sequences')} validation sequences; quantization "
        f"sweep: {', '.join(cfg.get('quant', [])) or 'none'} (calibrated on {cfg.get('calib_batches')} "
        "training batches)",
        f"machine: {machine.get('cpu')} ({machine.get('cpu_count')} CPUs), {machine.get('gpu') or 'no GPU'}, "
        f"device {machine.get('device')}, {machine.get('platform')}, "
        f"torch {machine.get('torch')}, quietgpt {machine.get('quietgpt')}",
        f"runs: {n_ok} ok of {len(runs)}, {machine.get('jobs', '?')} at a time ({machine.get('launcher', '?')} "
        f"launcher); wall time of the study: {fmt(results.get('wall_s'))} s "
        f"(sum over runs {fmt(sum(r.get('wall_s') or 0 for r in runs))} s)",
    ])]
    summary = results.get("summary", {})
    blocks += [("h2", "Summary (mean [95% CI] over seeds)"),
               ("table", ["metric", *variants],
                [[metrics.get(m, {}).get("label", m),
                  *[_cell_ci(summary[m].get(v)) for v in variants]]
                 for m in [*[m for m in results.get("metric_order", []) if m in summary],
                           *[m for m in summary if m not in results.get("metric_order", [])]]])]
    comps = results.get("comparisons", [])
    blocks += [("h2", f"Paired comparisons against {cfg.get('baseline')}"),
               ("p", "Differences are variant minus baseline, paired by seed. The interval is the 95% Student-t "
                     "interval of the per-seed differences; p-values are the paired t-test and the exact "
                     "sign-flip permutation test over all 2^n sign patterns (whose smallest possible two-sided "
                     "p-value is 2/2^n: 0.25 with 3 seeds, so with few seeds it cannot reach 0.05 whatever "
                     "the data). A direction is claimed only when the interval excludes 0."),
               ("table", ["metric", "variant", "diff", "95% CI", "n", "t-test p", "exact p", "verdict"],
                [[metrics.get(c["metric"], {}).get("label", c["metric"]), f"{c['a']} vs {c['b']}",
                  fmt(c.get("diff_mean")), f"{fmt(c.get('ci95_low'))} .. {fmt(c.get('ci95_high'))}",
                  str(c.get("n")), fmt(c.get("p_value"), 2), fmt(c.get("p_exact"), 2), c.get("verdict", "")]
                 for c in comps])]
    blocks += [("h2", "Definitions"), ("ul", [f"{m.get('label', k)} (`{k}`, {m.get('unit', '')}): "
                                               f"{m.get('definition', '')}" + (f" [{m['paper']}]" if m.get("paper")
                                                                                 not in (None, "-") else "")
                                               for k, m in metrics.items()])]
    blocks += [("h2", "Plots")]
    for path, caption in plots:
        blocks.append(("img", path, caption))
    failed = [r for r in runs if r.get("status") != "ok"]
    blocks += [("h2", "Failed runs")]
    if failed:
        blocks.append(("table", ["variant", "seed", "folder", "error"],
                       [[r["variant"], str(r["seed"]), r.get("dir") or "", r.get("error") or ""] for r in failed]))
    else:
        blocks.append(("p", "None: every run finished."))
    return blocks


def _md_text(s: str) -> str:
    # Markdown renderers pass raw HTML through, so data never reaches the page as markup.
    return html.escape(str(s), quote=False)


def _md_cell(s: str) -> str:
    return _md_text(" ".join(str(s).split())).replace("|", "\\|")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out.append(f"# {_md_text(b[1])}\n")
        elif kind == "h2":
            out.append(f"## {_md_text(b[1])}\n")
        elif kind == "p":
            out.append(f"{_md_text(b[1])}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {_md_text(x)}" for x in b[1]) + "\n")
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
                     "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{_md_cell(b[2])}]({b[1]})\n\n*{_md_text(b[2])}*\n")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}
figcaption{color:#555;font-size:.9em}"""


def render_html(blocks: list[tuple], study_dir: Path) -> str:
    """One self-contained page: inline CSS, PNGs as base64 data URIs, every data string escaped."""
    e = html.escape
    title = next((b[1] for b in blocks if b[0] == "h1"), "quietgpt study")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((study_dir / b[1]).read_bytes()).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b[2])}">'
                       f"<figcaption>{e(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- entry point


def write_report(study_dir: str | Path) -> dict[str, Path]:
    """Write plots/*.png, report.md and report.html from results.json and the run folders.

    Returns {"md": path, "html": path, "plots": [paths]}. Plots with no data behind them (a study whose
    runs all failed, say) are left out and the report says which ones are missing.
    """
    study_dir = Path(study_dir)
    results = load_results(study_dir)
    cfg = results.get("config", {})
    variants = list(cfg.get("variants", []))
    data = _run_data(study_dir, results.get("runs", []))
    plot_dir = study_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, str]] = []

    def add(name: str, ok: bool, caption: str) -> None:
        if ok:
            plots.append((f"plots/{name}", caption))

    add("loss_curves.png", plot_loss_curves(data, variants, plot_dir / "loss_curves.png"),
        "Loss curves per variant: mean over seeds, band = min..max over seeds.")
    add("weight_kurtosis.png", plot_weight_kurtosis(data, variants, plot_dir / "weight_kurtosis.png",
                                                    BLOCK_WEIGHTS.keep),
        "Per-layer kurtosis of the block matmul weights (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj).")
    add("activations.png", plot_activations(data, variants, plot_dir / "activations.png", ACTIVATIONS.keep),
        f"Per-layer activation infinity norm and kurtosis over the sites {', '.join(ACT_SITES)}.")
    for v in variants:
        if v in NULL_VARIANTS:
            name = f"unassigned_mass_{_safe_name(v)}.png"
            add(name, plot_unassigned_mass(data, v, plot_dir / name),
                f"{v}: unassigned attention mass (1 - sum of the attention weights) per layer and head.")
    add("quant_ppl.png", plot_quant_ppl(results.get("runs", []), variants, cfg.get("quant", []),
                                        plot_dir / "quant_ppl.png"),
        "Validation perplexity in floating point and under each quantization config of the sweep.")
    add("attention_maps.png", plot_attention_maps(data, variants, plot_dir / "attention_maps.png"),
        "Attention maps of one validation sample in the last layer, first seed of each variant.")
    blocks = build_document(results, plots)
    md_path, html_path = study_dir / "report.md", study_dir / "report.html"
    atomic_write_text(md_path, render_markdown(blocks))
    atomic_write_text(html_path, render_html(blocks, study_dir))
    return {"md": md_path, "html": html_path, "plots": [study_dir / p for p, _ in plots]}


def text_summary(results: dict) -> str:
    """What `quietgpt study` and `quietgpt report` print: the headline metrics per variant (mean [95% CI]),
    their verdicts against the baseline, and any failed runs. Plain text for a terminal."""
    variants = results.get("config", {}).get("variants", [])
    metrics = results.get("metrics", {})
    summary = results.get("summary", {})
    runs = results.get("runs", [])
    headline = [m for m in results.get("metric_order", []) if metrics.get(m, {}).get("headline") and m in summary]
    rows = [[metrics[m].get("label", m), *[_cell_ci(summary[m].get(v)) for v in variants]] for m in headline]
    header = ["metric", *variants]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"{sum(r.get('status') == 'ok' for r in runs)} of {len(runs)} runs ok; study wall time "
             f"{fmt(results.get('wall_s'))} s; mean [95% CI] over seeds:"]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    lines.append("verdicts (paired by seed, against the baseline):")
    lines += [f"- {c['verdict']}" for c in results.get("comparisons", []) if c["metric"] in headline]
    lines += [f"FAILED {r['variant']} seed {r['seed']}: {r.get('error')}" for r in runs if r.get("status") != "ok"]
    return "\n".join(lines)
