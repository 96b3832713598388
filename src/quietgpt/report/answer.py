"""The report's top-line answer, generated from the study's numbers and verdicts (never hand-written).

The question: do the attention fixes let heads abstain, and so remove the outliers that make transformers
hard to quantize? The answer has three parts, each read off results.json:

1. did the baseline have the problem at all? Judged from the baseline's own means against the
   thresholds below (a study whose softmax model has no outliers cannot show a fix removing them);
2. per fix: does it abstain (unassigned attention mass), which differences to the baseline survive
   Holm's correction over all the study's comparisons (findings), which only exclude 0 before it (leads);
3. what the number of seeds allows (the exact test's floor, the width of t intervals).
"""

from __future__ import annotations

from quietgpt.report.cells import (
    MASS_METRIC,
    ZERO_TOL,
    is_penalty,
    label,
    significant,
    subtracts_mass,
    symbol_key,
    zero_by_construction,
)
from quietgpt.stats import exact_floor_note, fmt

# ----------------------------------------------------------------------------- "did the baseline have the problem?"
# Thresholds in one place. Kurtosis (Pearson): a Gaussian has 3, a Laplace 6. Models with the outliers the
# fixes target are far beyond: Bondarenko et al. 2023 (Quantizable Transformers, Table 2) report an average
# activation kurtosis of ~1,800 for vanilla OPT-125m and thousands for BERT-base, and their fixes bring it to
# the tens. 10 is this project's line for "heavier-tailed than any textbook distribution a trained layer
# should have": below it there are no outliers worth removing. The W8A8 perplexity penalty of a model with
# outliers is several percent up to total failure in the same paper; under 1% means 8-bit quantization costs
# (next to) nothing.
#
# The quantization line is judged on every configuration the study measured: a penalty of 10% or more at any of
# them is a problem. Sources: GPTQ (Frantar et al., ICLR 2023, Tables 3-4) reports 4-bit models within a few
# percent of FP16 perplexity at 125M-175B parameters and round-to-nearest blowing up far beyond that; Bondarenko
# et al. 2023 (Table 2) report W8A8 penalties of several percent for their outlier models. 10% is well past
# what a method practitioners deploy would accept, so a model that loses that much under some grid has a
# quantization problem there (which grid is named beside it).
OUTLIER_KURTOSIS = 10.0
GAUSSIAN_KURTOSIS = 3.0
QUANT_PENALTY_PCT = 10.0  # perplexity over FP, percent, at any configuration the study measured
KURTOSIS_CHECKS = ("weight_kurtosis_max", "act_kurtosis_mean")  # the registry's headline tail metrics
# What the short answer groups (with the quantization penalties, ppl_ratio_*); everything else is in the
# per-fix lines only (ppl_<q> mixes quality and quantization, so it is in neither group).
OUTLIER_METRICS = ("weight_kurtosis_mean", "weight_kurtosis_max", "act_inf_norm_max", "act_kurtosis_mean")
QUALITY_METRICS = ("val_loss", "ppl")


def _mean(results: dict, metric: str, variant: str) -> float | None:
    return ((results.get("summary", {}).get(metric) or {}).get(variant) or {}).get("mean")


def _label(results: dict, metric: str) -> str:
    return label(metric, results.get("metrics", {}).get(metric, {}))


def baseline_problem(results: dict) -> tuple[bool | None, str]:
    """(had the problem: True / False / None = cannot tell, one sentence saying why), judged from the tail
    metrics' means and every quantization penalty the study measured."""
    cfg = results.get("config", {})
    b, quant = cfg.get("baseline"), list(cfg.get("quant", []))
    heavy, calm = [], []
    for m in KURTOSIS_CHECKS:
        x = _mean(results, m, b)
        if x is not None:
            (heavy if x > OUTLIER_KURTOSIS else calm).append(f"{_label(results, m)} {fmt(x)}")
    pens = {q: _mean(results, f"ppl_ratio_{q}", b) for q in quant}
    pens = {q: (r - 1) * 100 for q, r in pens.items() if r is not None}
    if not (heavy or calm) and not pens:
        return None, f"Did {b} have the problem? Cannot tell: no kurtosis or quantization numbers were measured."
    costly = {q: x for q, x in pens.items() if x >= QUANT_PENALTY_PCT}
    listed = "; ".join(f"{q} {fmt(x, 3)}%" for q, x in pens.items())
    cost = (f"quantization costs {listed} perplexity ({'at least' if costly else 'each under'} "
            f"{fmt(QUANT_PENALTY_PCT)}%" + (f" under {', '.join(costly)}" if costly else "") + ")"
            if pens else "no quantization was measured")
    tails = (f"{', '.join(heavy)} above {fmt(OUTLIER_KURTOSIS)} (heavy tails)" if heavy else "") + \
            ("; " if heavy and calm else "") + \
            (f"{', '.join(calm)}, near a Gaussian's {fmt(GAUSSIAN_KURTOSIS)} (outliers here: above "
             f"{fmt(OUTLIER_KURTOSIS)})" if calm else "")
    if not heavy and not costly:
        return False, (f"Did {b} have the problem? No: {tails}, and {cost}. The baseline shows no outliers and no "
                       "quantization problem at this scale, so there is nothing for a fix to remove.")
    word = "Yes" if heavy and costly else "Partly" if heavy else "Yes, in quantization"
    return True, f"Did {b} have the problem? {word}: {tails}, and {cost}."


# ----------------------------------------------------------------------------- per fix


def abstention(results: dict, v: str) -> str:
    s = (results.get("summary", {}).get(MASS_METRIC) or {}).get(v) or {}
    m = s.get("mean")
    if zero_by_construction(MASS_METRIC, v):
        return "cannot leave attention on nothing (0 by construction)"
    if m is None:
        return "unassigned mass not measured"
    if abs(m) < ZERO_TOL:
        return "leaves no measurable attention on nothing"
    lo, hi = s.get("ci95_low"), s.get("ci95_high")
    ci = ""
    if lo is not None and hi is not None:  # a mass above 1 is impossible: then the interval says nothing
        ci = (" (95% CI uninformative)" if hi > 1 else " (95% CI includes 0)" if lo <= 0 <= hi
              else f" [{fmt(lo * 100)}, {fmt(hi * 100)}]")
    if subtracts_mass(v):
        return (f"rows sum to 1 - lambda: {fmt(m * 100)}%{ci} of attention subtracted, then renormalised per "
                "head (not abstention)")
    verb = "heads abstain" if m > 0 else "heads over-assign"
    return f"{verb}: {fmt(abs(m) * 100)}%{ci} of attention on nothing"


def _change(results: dict, c: dict, with_size: bool = True) -> str:
    """'lowers validation loss by 0.0068, 0.23% of the baseline (better)'; without the relative size
    'validation loss lower by 0.0068 (better)'. Every direction word comes with its number; better/worse from
    the registry's higher_is_worse."""
    desc = results.get("metrics", {}).get(c["metric"], {})
    up = c["diff_mean"] > 0
    worse = desc.get("higher_is_worse")
    judged = "" if worse is None else ("worse" if up == bool(worse) else "better")
    name = _label(results, c["metric"])
    if not with_size:
        size = (f"{fmt(abs(c['diff_mean']) * 100, 2)} pp" if is_penalty(c["metric"])
                else fmt(abs(c["diff_mean"])))
        return f"{name} {'higher' if up else 'lower'} by {size}{f' ({judged})' if judged else ''}"
    if is_penalty(c["metric"]):
        size = f"{fmt(abs(c['diff_mean']) * 100, 2)} percentage points"
    else:
        b_mean = c.get("b_mean")
        # as in stats.verdict: a percentage of a near-zero baseline (softmax's unassigned mass) means nothing
        rel = f", {fmt_pct(c['diff_mean'], b_mean)}" if b_mean and abs(c["diff_mean"]) <= 10 * abs(b_mean) else ""
        size = f"{fmt(abs(c['diff_mean']))}{rel}"
    return f"{'raises' if up else 'lowers'} {name} by {size}{f' ({judged})' if judged else ''}"


def fmt_pct(diff: float, base: float) -> str:
    return f"{fmt(abs(diff) / abs(base) * 100, 2)}% of the baseline"


def fix_line(results: dict, v: str) -> str:
    """One sentence per fix: abstention, then findings (Holm), then leads, then 'no other difference'."""
    comps = [c for c in results.get("comparisons", []) if c.get("a") == v and c["metric"] != MASS_METRIC
             and c.get("family", "exploratory") == "exploratory"]
    found = [c for c in comps if significant(c)]
    leads = [c for c in comps if symbol_key(c) in ("lead_up", "lead_down")]
    parts = [abstention(results, v)]
    if found:
        parts.append("significant after Holm's correction: " + ", ".join(_change(results, c, True) for c in found))
    if leads:
        parts.append("leads that do not survive the correction: "
                     + ", ".join(_change(results, c, False) for c in leads))
    rest = len(comps) - len(found)
    if not found:
        parts.append(f"no difference survives correction ({len(comps)} metrics compared)")
    elif rest:
        parts.append(f"no other difference survives correction ({rest} more metrics)")
    return f"{v} (exploratory): " + "; ".join(parts) + "."


def short_answer(results: dict, had_problem: bool | None) -> str:
    """The first line: abstention, outliers / quantization, quality, across every fix."""
    cfg = results.get("config", {})
    b = cfg.get("baseline")
    fixes = [v for v in cfg.get("variants", []) if v != b]
    comps = [c for c in results.get("comparisons", []) if c.get("a") in fixes
             and c.get("family", "exploratory") == "exploratory"]
    abstain = [v for v in fixes if (_mean(results, MASS_METRIC, v) or 0) > ZERO_TOL
               and not zero_by_construction(MASS_METRIC, v) and not subtracts_mass(v)]
    out = [f"{', '.join(abstain)} let heads abstain" if abstain else "no fix leaves attention on nothing"]
    if had_problem is False:
        out.append(f"but {b} shows no outliers at this scale, so there is nothing to remove")

    def sig(kind) -> list[str]:
        return [f"{c['a']} {_change(results, c, False)}" for c in comps if significant(c) and kind(c["metric"])]

    outl = sig(lambda m: m in OUTLIER_METRICS or is_penalty(m))
    qual = sig(lambda m: m in QUALITY_METRICS)
    out.append(("significant outlier / quantization changes: " + ", ".join(outl)) if outl
               else "no outlier or quantization difference survives Holm's correction")
    out.append(("significant quality changes: " + ", ".join(qual)) if qual
               else "no quality difference (validation loss, perplexity) survives it " + ("either" if not outl
                                                                                      else "at all"))
    conf = results.get("confirmatory")
    head = ""
    if conf:
        head = "Confirmatory: " + "; ".join(f"{h['name']} ({h['a']}, {h['metric']}, {h['direction']}) "
                                            f"{h['decision']}" for h in conf.get("hypotheses", [])) + ". "
    return head + "Short answer (exploratory): " + "; ".join(out) + "."


def answer(results: dict) -> dict[str, str | list[str]]:
    """The answer's parts: "short" (one line over all fixes), "baseline" (did it have the problem?),
    "fixes" (one line per fix), "power" (what the number of seeds allows)."""
    cfg = results.get("config", {})
    b = cfg.get("baseline")
    fixes = [v for v in cfg.get("variants", []) if v != b]
    had, base_line = baseline_problem(results)
    comps = results.get("comparisons", [])
    power = ""
    if comps:
        n = min((c.get("n") or 0 for c in comps if c.get("n")), default=0)  # n = 0: a metric neither arm has
        n_tests = max((c.get("n_tests") or 0 for c in comps), default=0)
        note = exact_floor_note(n)
        power = (f"Power: {n} paired seed{'s' if n != 1 else ''} per comparison, {n_tests} exploratory comparisons "
                 f"corrected together (Holm, family-wise 5%)" + (f"; {note}" if note else "") + ".")
    return {"short": short_answer(results, had), "baseline": base_line,
            "fixes": [fix_line(results, v) for v in fixes], "power": power}


def answer_lines(results: dict) -> list[str]:
    """The answer as a few sentences: short answer, the baseline, one line per fix, what n allows."""
    a = answer(results)
    return [a["short"], a["baseline"], *a["fixes"], *([a["power"]] if a["power"] else [])]


def question(results: dict) -> str:
    cfg = results.get("config", {})
    b = cfg.get("baseline")
    fixes = [v for v in cfg.get("variants", []) if v != b] or ["the fixes"]
    return (f"Question: do {', '.join(fixes)} (against {b}) let attention heads abstain, and so remove the "
            "outlier weights and activations that make transformers hard to quantize, at what cost in quality?")
