"""Power: what a study's number of seeds can detect, before it runs (`quietgpt study --plan`, from each primary
hypothesis' prior standard deviation) and after (the report, from the paired differences it observed).

For each hypothesis, at the level its Holm family gives its first step (alpha / m, m hypotheses: the
hardest one to pass), the smallest one-sided p its test can reach with n seeds, and the smallest effect (in the
metric's units) detected with 80% and 90% power by the one-sided paired t-test (noncentral t) and by the exact
sign-flip test (Monte Carlo over normal differences).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from quietgpt.stats import detectable_effect_sign_flip, detectable_effect_t, fmt, min_exact_pvalue
from quietgpt.study.spec import StudySpec

POWERS = (0.8, 0.9)


def power_rows(spec: StudySpec, sds: Mapping[str, float | None], n: int) -> list[dict]:
    """One row per primary hypothesis: {name, n, alpha_step, sd, min_p_exact, t: {power: effect}, sign_flip:
    {power: effect}} (effects None without an sd)."""
    m = max(1, len(spec.primary))
    step = spec.alpha / m
    out = []
    for h in spec.primary:
        sd = sds.get(h.name)
        out.append({"name": h.name, "metric": h.metric, "test": h.test, "n": n, "alpha_step": step, "sd": sd,
                    "min_p_exact": min_exact_pvalue(n, 1),
                    "t": {str(p): detectable_effect_t(n, sd, step, p) if sd else None for p in POWERS},
                    "sign_flip": {str(p): detectable_effect_sign_flip(n, sd, step, p) if sd else None
                                  for p in POWERS}})
    return out


def power_table(spec: StudySpec, rows: Sequence[Mapping]) -> list[dict]:
    """power_rows from the SD of the paired differences each hypothesis' runs show (the seeds it had)."""
    sds, ns = {}, []
    for h in spec.primary:
        a = {r["seed"]: r.get(h.metric) for r in rows if r["variant"] == h.variant and r.get("status") == "ok"}
        b = {r["seed"]: r.get(h.metric) for r in rows
             if r["variant"] == spec.baseline_arm and r.get("status") == "ok"}
        d = [float(a[s]) - float(b[s]) for s in a if s in b and a[s] is not None and b[s] is not None]
        sds[h.name] = float(np.std(d, ddof=1)) if len(d) >= 2 else None
        ns.append(len(d))
    return power_rows(spec, sds, min(ns, default=0))


def plan_text(spec: StudySpec) -> str:
    """`quietgpt study --plan`: the study's seeds, what its exact test can reach, and per hypothesis the effect
    detectable from its prior sd (study.primary.sd)."""
    n = len(spec.seeds)
    lines = [f"{spec.preset}: {len(spec.arms)} arms x {n} seeds (seeds {spec.seeds[0]}..{spec.seeds[-1]}) = "
             f"{len(spec.arms) * n} runs; the exact sign-flip test's smallest p with {n} paired seeds is "
             f"{fmt(min_exact_pvalue(n, 2), 2)} two-sided, {fmt(min_exact_pvalue(n, 1), 2)} one-sided"]
    if not spec.primary:
        lines.append("no primary hypotheses: every comparison is exploratory (one Holm family)")
    for r in power_rows(spec, {h.name: h.sd for h in spec.primary}, n):
        head = (f"{r['name']} ({r['metric']}, {r['test']}): level {fmt(r['alpha_step'], 2)} for Holm's first step "
                f"over {len(spec.primary)} hypotheses at alpha {fmt(spec.alpha)}")
        if r["sd"] is None:
            lines.append(head + "; no prior sd (study.primary.sd), so no detectable effect")
            continue
        eff = "; ".join(f"{int(float(p) * 100)}% power: t {fmt(r['t'][p], 3)}, sign-flip {fmt(r['sign_flip'][p], 3)}"
                        for p in r["t"])
        lines.append(f"{head}; prior sd {fmt(r['sd'])}: smallest detectable effect {eff}")
    return "\n".join(lines)
