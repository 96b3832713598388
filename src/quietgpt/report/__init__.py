"""A study's report: report.md, a self-contained report.html, and plots/*.png, from results on disk.

`write_report(study_dir)` reads results.json (runs, summary, comparisons, config; see study.py) and each
run's folder (metrics.jsonl, eval.json, attn_sample.npz) and writes:

    plots/loss_curves.png            train and val loss per variant: mean over seeds, band = min..max
    plots/weight_kurtosis.png        per-layer kurtosis of the block matmul weights
    plots/activations.png            per-layer activation infinity norm and kurtosis
    plots/unassigned_mass_<v>.png    attention mass left on "nothing", layer x head, one per null variant
    plots/quant_ppl.png              perplexity in floating point and across the quantization sweep
    plots/attention_maps.png         one sample's attention maps in the last layer, per variant
    plots/trajectories.png           outliers through training per variant (studies with trajectories)
    report.md, report.html           question, setup, summary, comparisons with verdicts, plots, failures

The package: plots.py (one function per figure), document.py (the blocks and their Markdown/HTML
renderings), trajectories.py (the "Outliers through training" section); this module reads a study and
writes everything. Nothing is trained or measured here, so `quietgpt report DIR` can rebuild everything at
any time. The HTML embeds the PNGs as base64 data URIs,
has no external CSS or JS (works offline and as an email attachment), and every string that came from
data or configs goes through html.escape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..attention import NULL_VARIANTS  # the variants that can leave attention mass on "nothing"
from ..errors import QuietError
from ..registry import ACT_SITES, ACTIVATIONS, BLOCK_WEIGHTS
from ..stats import fmt
from .document import build_document, cell_ci, render_html, render_markdown
from .plots import (
    plot_activations,
    plot_attention_maps,
    plot_loss_curves,
    plot_quant_ppl,
    plot_unassigned_mass,
    plot_weight_kurtosis,
    safe_name,
)
from .trajectories import insert_section, trajectory_section

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
            name = f"unassigned_mass_{safe_name(v)}.png"
            add(name, plot_unassigned_mass(data, v, plot_dir / name),
                f"{v}: unassigned attention mass (1 - sum of the attention weights) per layer and head.")
    add("quant_ppl.png", plot_quant_ppl(results.get("runs", []), variants, cfg.get("quant", []),
                                        plot_dir / "quant_ppl.png"),
        "Validation perplexity in floating point and under each quantization config of the sweep.")
    add("attention_maps.png", plot_attention_maps(data, variants, plot_dir / "attention_maps.png"),
        "Attention maps of one validation sample in the last layer, first seed of each variant.")
    blocks = build_document(results, plots)
    section = trajectory_section(results, data, plot_dir)
    blocks = insert_section(blocks, section)
    plots = [(b[1], b[2]) for b in blocks if b[0] == "img"]  # in document order
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
    rows = [[metrics[m].get("label", m), *[cell_ci(summary[m].get(v)) for v in variants]] for m in headline]
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
