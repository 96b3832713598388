"""A study's report: report.md, a self-contained report.html, and plots/*.png, from results on disk.

`write_report(study_dir)` reads results.json (runs, summary, comparisons, config; see study/results.py)
and each run's folder (metrics.jsonl, eval.json, attn_sample.npz) and writes:

    plots/forest.png                 the first figure: per headline metric, each variant's paired difference
                                     to the baseline with its 95% interval, Holm-significant ones marked
    plots/loss_curves.png            train and val loss per variant: mean over seeds, band = min..max
    plots/weight_kurtosis.png        per-layer kurtosis of the block matmul weights
    plots/activations.png            per-layer activation infinity norm and kurtosis
    plots/unassigned_mass.png        attention mass left on "nothing", layer x head, every variant that can
                                     leave mass (null variants and clipped), one shared colour scale
    plots/quant_ppl.png              perplexity (y from 0) and the quantization penalty in percent
    plots/attention_maps.png         one sample's attention maps (its first positions) in the last layer
    plots/trajectories.png           outliers through training per variant (studies with trajectories)
    report.md, report.html           answer, forest plot, effects table, failed runs; then, folded:
                                     setup, means, every verdict in full, the other figures, definitions

The package: answer.py (the generated top-line answer and its thresholds), cells.py (how a number is
printed), plots.py (one function per figure), document.py (the blocks and their Markdown/HTML
renderings), trajectories.py (the "Outliers through training" section); this module reads a study and
writes everything. Nothing is trained or measured here, so `quietgpt report DIR` can rebuild everything
at any time. The HTML embeds the PNGs as base64 data URIs,
has no external CSS or JS (works offline and as an email attachment), and every string that came from
data or configs goes through html.escape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quietgpt.errors import QuietError
from quietgpt.measurement.registry import ACT_SITES, ACTIVATIONS, BLOCK_WEIGHTS
from quietgpt.report.answer import answer_lines
from quietgpt.report.cells import (
    CAN_LEAVE_MASS,
    baseline_value,
    effect_unit,
    is_penalty,
    label,
    scale,
    summary_cell,
    symbol_key,
)
from quietgpt.report.document import build_document, render_html, render_markdown
from quietgpt.report.plots import (
    plot_activations,
    plot_attention_maps,
    plot_forest,
    plot_loss_curves,
    plot_quant_ppl,
    plot_unassigned_mass,
    plot_weight_kurtosis,
)
from quietgpt.report.quantization import predictors_section, sensitivity_section
from quietgpt.report.trajectories import insert_section, trajectory_section
from quietgpt.stats import fmt
from quietgpt.utils.atomic import atomic_write_text

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


# ----------------------------------------------------------------------------- entry point


def arms_view(results: dict) -> dict:
    """The results as the report reads them: its columns are the study's arms. A study that crosses variants
    with optimizers has arms "variant+optimizer" and a baseline arm; the report then shows those in place
    of the bare variants (results.json itself keeps both)."""
    cfg = results.get("config", {})
    if not cfg.get("arms") or cfg.get("arms") == cfg.get("variants"):
        return results
    return {**results, "config": {**cfg, "variants": list(cfg["arms"]), "baseline": cfg.get("baseline_arm")}}


def write_report(study_dir: str | Path) -> dict[str, Path]:
    """Write plots/*.png, report.md and report.html from results.json and the run folders.

    Returns {"md": path, "html": path, "plots": [paths]} (the forest plot first). Plots with no data
    behind them (a study whose runs all failed, say) are left out; other PNGs in plots/ (an older
    report's) are removed, so plots/ matches the report.
    """
    study_dir = Path(study_dir)
    results = arms_view(load_results(study_dir))
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
    mass = [v for v in variants if v.partition("+")[0] in CAN_LEAVE_MASS]  # an arm "variant+optimizer"
    add("unassigned_mass.png", plot_unassigned_mass(data, mass, plot_dir / "unassigned_mass.png"),
        f"Unassigned attention mass (1 - sum of the attention weights) per layer and head of {', '.join(mass)}, "
        "on one colour scale taken from the data. softmax and gated leave none by construction.")
    add("quant_ppl.png", plot_quant_ppl(results.get("runs", []), variants, cfg.get("quant", []),
                                        plot_dir / "quant_ppl.png"),
        "Left: validation perplexity in floating point and under each quantization config (y-axis from 0). "
        "Right: the quantization penalty, perplexity over FP in percent (bar = mean, dots = seeds).")
    model = cfg.get("run", {}).get("model", {})
    add("attention_maps.png", plot_attention_maps(data, variants, plot_dir / "attention_maps.png",
                                                  model.get("block_size")),
        "Attention maps of one validation sample in the last layer, first seed of each variant: only the "
        "sample's first positions (the title says how many), not the whole context.")
    forest = None
    if plot_forest(forest_panels(results), plot_dir / "forest.png", cfg.get("baseline", "?")):
        forest = ("plots/forest.png", f"Paired difference to {cfg.get('baseline')} (variant - baseline; 95% t "
                  "interval over seeds) per primary hypothesis, headline metric and quantization penalty. "
                  "Exploratory unless marked primary: filled and starred = significant after Holm's correction "
                  "over the exploratory comparisons; hollow in colour: the interval excludes 0 only before it.")
    shown = ([forest] if forest else []) + plots
    for stale in set(plot_dir.glob("*.png")) - {study_dir / f for f, _ in shown}:
        stale.unlink(missing_ok=True)  # plots/ holds this report's figures only (not an older layout's)
    blocks = build_document(results, plots, forest)
    section = trajectory_section(results, data, plot_dir)  # writes plots/trajectories.png when it has data
    section += sensitivity_section(results, plot_dir) + predictors_section(results)  # plots/sensitivity_*.png
    blocks = insert_section(blocks, section)
    at = 1 if forest else 0  # the section sits after the forest plot and before the folded figures
    shown[at:at] = [(b[1], b[2]) for b in section if b[0] == "img"]
    md_path, html_path = study_dir / "report.md", study_dir / "report.html"
    atomic_write_text(md_path, render_markdown(blocks))
    atomic_write_text(html_path, render_html(blocks, study_dir))
    return {"md": md_path, "html": html_path,
            "plots": [study_dir / f for f, _ in shown]}


def forest_metrics(results: dict) -> list[str]:
    """The forest plot's panels: the primary hypotheses' metrics, then the headline metrics, then every
    quantization penalty the study measured (registry order within each group)."""
    metrics, order = results.get("metrics", {}), results.get("metric_order", [])
    primary = [h["metric"] for h in (results.get("confirmatory") or {}).get("hypotheses", [])]
    out = list(dict.fromkeys(primary))
    out += [m for m in order if metrics.get(m, {}).get("headline") and m not in out]
    out += [m for m in order if is_penalty(m) and m not in out]
    return out


def forest_panels(results: dict) -> list[dict]:
    """plot_forest's input: one panel per forest_metrics entry that has comparisons, one row per fix, in the
    report's units (penalties in percentage points); a primary metric's title says so."""
    cfg, metrics = results.get("config", {}), results.get("metrics", {})
    b = cfg.get("baseline")
    fixes = [v for v in cfg.get("variants", []) if v != b]
    by = {(c["metric"], c["a"]): c for c in results.get("comparisons", [])}
    primary = {h["metric"] for h in (results.get("confirmatory") or {}).get("hypotheses", [])}
    panels = []
    for m in forest_metrics(results):
        desc = metrics.get(m, {})
        if not any((m, v) in by for v in fixes):
            continue
        k, rows = scale(m), []
        for v in fixes:
            c = by.get((m, v), {})
            x, lo, hi = c.get("diff_mean"), c.get("ci95_low"), c.get("ci95_high")
            worse = desc.get("higher_is_worse")
            judged = None if worse is None or x is None else ("worse" if (x > 0) == bool(worse) else "better")
            rows.append({"label": v, "x": None if x is None else x * k, "lo": None if lo is None else lo * k,
                         "hi": None if hi is None else hi * k, "kind": symbol_key(c) if c else "na",
                         "judged": judged})
        shown = baseline_value(m, b, (results.get("summary", {}).get(m) or {}).get(b))
        tag = "primary, see the confirmatory result" if m in primary else "exploratory"
        panels.append({"title": f"{label(m, desc)} ({tag})\n({b}: {shown})",
                       "xlabel": f"difference ({effect_unit(m, desc)})", "rows": rows})
    return panels


def text_summary(results: dict) -> str:
    """What `quietgpt study` and `quietgpt report` print: the headline metrics per variant (mean [95% CI]),
    their verdicts against the baseline, and any failed runs. Plain text for a terminal."""
    results = arms_view(results)
    variants = results.get("config", {}).get("variants", [])
    metrics = results.get("metrics", {})
    summary = results.get("summary", {})
    runs = results.get("runs", [])
    headline = [m for m in results.get("metric_order", []) if metrics.get(m, {}).get("headline") and m in summary]
    rows = [[label(m, metrics[m]), *[summary_cell(m, metrics[m], v, summary[m].get(v)) for v in variants]]
            for m in headline]
    header = ["metric", *variants]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"{sum(r.get('status') == 'ok' for r in runs)} of {len(runs)} runs ok; study wall time "
             f"{fmt(results.get('wall_s'))} s"]
    conf = results.get("confirmatory")
    if conf:
        lines.append("confirmatory result (pre-registered hypotheses, Holm over them alone):")
        lines += [f"- {h['sentence']}" for h in conf.get("hypotheses", [])]
        if conf.get("preregistration_note"):
            lines.append(f"  {conf['preregistration_note']}")
    lines.append("mean [95% CI] over seeds:")
    for r in [header, *rows]:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    lines.append("verdicts (paired by seed, against the baseline; exploratory unless primary):")
    lines += [f"- {c['verdict']}" for c in results.get("comparisons", []) if c["metric"] in headline]
    lines += [f"FAILED {r['variant']} seed {r['seed']}: {r.get('error')}" for r in runs if r.get("status") != "ok"]
    lines.append("answer (generated from the verdicts; report.html has the forest plot):")
    lines += [f"- {a}" for a in answer_lines(results)]
    return "\n".join(lines)
