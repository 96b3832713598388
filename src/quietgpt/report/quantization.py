"""The report's quantization sections (results.json's "sensitivity" and "predictors", study/results.py and
study/predictors.py): where the penalty lives, one tensor group at a time, as a variant x group heat map;
and which outlier metric predicts the damage (Spearman correlations with bootstrap intervals)."""

from __future__ import annotations

from pathlib import Path

from quietgpt.report.plots import plot_sensitivity, safe_name
from quietgpt.stats import fmt, fmt_interval


def sensitivity_section(results: dict, plot_dir: Path) -> list[tuple]:
    """Blocks for every config measured one group at a time; [] when the study measured none."""
    sens = results.get("sensitivity") or {}
    if not sens:
        return []
    cfg = results.get("config", {})
    variants, baseline = list(cfg.get("variants", [])), cfg.get("baseline")
    blocks: list[tuple] = [("h2", "Where the penalty lives"),
                           ("p", "Each configuration below was also measured with one tensor group quantized at a "
                                 "time and everything else in float (weights: the tied token embedding / head, the "
                                 "position embedding, each block's qkv, attention-out, MLP-in and MLP-out matrices; "
                                 "activations: the embedding sum, each block's attention, linear and residual "
                                 "activations, the head). A group's number is its penalty alone; \"all\" is the "
                                 "whole configuration's. Means over seeds, exploratory.")]
    for q, s in sens.items():
        groups = [g for g in s.get("groups", []) if g != "all"]
        name = f"sensitivity_{safe_name(q)}.png"
        if plot_sensitivity(s.get("arms", {}), [*groups, "all"], variants, plot_dir / name,
                            f"{q}: penalty with one tensor group quantized alone"):
            blocks.append(("img", f"plots/{name}", f"{q}: each variant's penalty (% perplexity over FP, mean over "
                                                   "seeds) with only that group quantized; the last column is the "
                                                   "whole configuration."))
        base = s.get("arms", {}).get(baseline, {})
        worst = sorted((g for g in groups if g in base), key=lambda g: -base[g]["mean"])[:3]
        items = [f"{baseline}'s largest single-group penalties under {q}: " + ", ".join(
            f"{g} {fmt((base[g]['mean'] - 1) * 100, 3)}%" for g in worst)] if worst else []
        for arm, by_g in (s.get("diff") or {}).items():
            parts = [f"{g} {fmt_interval(d['diff'] * 100, d['ci95'][0] * 100, d['ci95'][1] * 100, signed=True)} pp"
                     for g in worst if (d := by_g.get(g)) and d["ci95"][0] is not None]
            if parts:
                items.append(f"{arm} - {baseline} in those groups (paired, 95% interval): " + "; ".join(parts))
        blocks.append(("ul", items))
    return blocks


def predictors_section(results: dict) -> list[tuple]:
    """Blocks with the Spearman table per penalty; [] when the study has no penalties or too few runs."""
    pred = (results.get("predictors") or {}).get("runs") or {}
    if not any(pred.values()):
        return []
    labels = {k: m.get("label", k) for k, m in (results.get("metrics") or {}).items()}
    order = (results.get("predictors") or {}).get("order") or []
    rank = {k: i for i, k in enumerate(order)}

    def ordered(table: dict) -> list:
        return sorted(table.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    inner: list[tuple] = [
        ("p", "Spearman's rank correlation of each outlier metric with each quantization penalty over the study's "
              "runs: pooled over all runs, and within variants (ranks taken within each variant, so the variants' "
              "own levels do not drive it), with 95% bootstrap intervals (2000 resamples of runs, stratified by "
              "variant). A metric predicts a penalty when both intervals exclude 0 with one sign (Vlassis et al., "
              "ICLR 2026, ask the same of kurtosis and max/mean ratios). Exploratory.")]
    for pen, table in pred.items():
        if not table:
            continue
        rows = [[labels.get(k, k), str(v["n"]), _rho(v["pooled"], v["pooled_ci"]), _rho(v["within"], v["within_ci"]),
                 "yes" if v["predicts"] else f"no ({v['note']})" if v.get("note") else "no"]
                for k, v in ordered(table)]
        good = [labels.get(k, k) for k, v in ordered(table) if v["predicts"]]
        inner += [("p", f"{labels.get(pen, pen)}: " + (f"predicted by {', '.join(good)}." if good else
                                                        "no outlier metric predicts it in both senses.")),
                   ("table", ["outlier metric", "runs", "pooled rho [95% CI]", "within-variant rho [95% CI]",
                              "predicts"], rows)]
    traj = (results.get("predictors") or {}).get("trajectory") or {}
    for pen, table in traj.items():
        if table:
            inner += [("p", f"Over training ({labels.get(pen, pen)} at every trajectory point that measured it; "
                             "the bootstrap resamples whole runs):"),
                       ("table", ["outlier metric", "points (runs)", "pooled rho [95% CI]"],
                        [[labels.get(k, k), f"{v['n_points']} ({v['n_runs']})", _rho(v["pooled"], v["pooled_ci"])]
                         for k, v in ordered(table)])]
    return [("details", "Which outlier metric predicts the damage (exploratory)", inner)]


def _rho(x, ci) -> str:
    if x is None:
        return "–"
    lo, hi = (ci or [None, None])[:2]
    return f"{x:+.2f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else "")
