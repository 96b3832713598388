"""Statistics for a study: means with confidence intervals over seeds, paired comparisons, verdicts.

A study trains every attention variant once per seed, from the same initial weights and the same data
order (a paired design), so the honest comparison of variant A with the baseline B is on the per-seed
differences d_s = A_s - B_s:

    mean_ci(values)        mean and 95% Student-t confidence interval (n = 1: the interval is undefined, None)
    paired(a, b)           mean difference with its 95% t interval, the paired t-test p-value
                           (scipy.stats.ttest_rel) and the exact sign-flip permutation p-value over all
                           2^n sign patterns (scipy.stats.permutation_test), which assumes no normality
    verdict(...)           one sentence that claims no more than the interval supports

Small n is the normal case here (3 seeds), so every result carries n, and the verdict says when the exact
test cannot reach p < 0.05 at all (with n pairs its smallest two-sided p-value is 2 / 2^n: 0.25 for n = 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
EXACT_TEST = "exact sign-flip permutation"


def _finite(values: Sequence[float | None]) -> np.ndarray:
    """float64 array of the finite values (None, NaN and inf dropped: a failed run has no value)."""
    out = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return np.asarray(out, dtype=np.float64)


def t_interval(x: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Two-sided Student-t interval for the mean of x: mean -+ t_{n-1, (1+c)/2} * sd / sqrt(n).

    None, None when n < 2 (no spread can be estimated from one value); a zero-width interval when all
    values are equal.
    """
    n = len(x)
    if n < 2:
        return None, None
    m = float(np.mean(x))
    half = float(sps.t.ppf((1.0 + confidence) / 2.0, n - 1)) * float(np.std(x, ddof=1)) / math.sqrt(n)
    return m - half, m + half


def mean_ci(values: Sequence[float | None], confidence: float = CONFIDENCE) -> dict:
    """{mean, ci95_low, ci95_high, n, sd} over the finite values; mean None when there are none,
    interval and sd None when n < 2."""
    x = _finite(values)
    n = len(x)
    lo, hi = t_interval(x, confidence)
    return {
        "mean": float(np.mean(x)) if n else None,
        "ci95_low": lo,
        "ci95_high": hi,
        "n": n,
        "sd": float(np.std(x, ddof=1)) if n >= 2 else None,
    }


def sign_flip_pvalue(d: np.ndarray, alternative: str = "two-sided") -> float | None:
    """Exact sign-flip permutation p-value of mean(d) = 0 over all 2^n sign patterns; alternative
    "two-sided", "less" (mean(d) < 0) or "greater".

    Under the null (no difference between the paired variants) each difference is as likely to be
    positive as negative, so flipping signs enumerates the null distribution exactly. None when n < 1.
    """
    if len(d) < 1:
        return None
    if np.all(d == 0):
        return 1.0
    res = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                               alternative=alternative)
    return float(min(1.0, res.pvalue))


def min_exact_pvalue(n: int, sides: int = 2) -> float:
    """The smallest p-value the exact sign-flip test can give with n pairs: 2 / 2^n two-sided, 1 / 2^n one-sided."""
    return min(1.0, sides / 2.0**n)


def one_sided_t_pvalue(d: np.ndarray, alternative: str) -> float | None:
    """The paired t-test's one-sided p-value for differences d (alternative "less" or "greater"); None when
    n < 2 or the differences have no spread."""
    if len(d) < 2 or float(np.std(d, ddof=1)) == 0:
        return None
    return float(sps.ttest_1samp(d, 0.0, alternative=alternative).pvalue)


# ----------------------------------------------------------------------------- power


def detectable_effect_t(n: int, sd: float, alpha: float, power: float) -> float | None:
    """The smallest mean paired difference (in sd's units) a one-sided paired t-test at level alpha detects
    with probability `power` from n pairs: solves the noncentral t power equation
    P(T' > t_{1-alpha, n-1}) = power, T' ~ nct(n - 1, delta sqrt(n) / sd). None when n < 2."""
    if n < 2 or not sd > 0:
        return None
    crit = float(sps.t.ppf(1 - alpha, n - 1))

    def gap(delta: float) -> float:
        return float(sps.nct.sf(crit, n - 1, delta * math.sqrt(n) / sd)) - power

    hi = sd
    while gap(hi) < 0:
        hi *= 2
    from scipy.optimize import brentq

    return float(brentq(gap, 0.0, hi, xtol=sd * 1e-6))


def power_sign_flip(n: int, effect: float, sd: float, alpha: float, sims: int = 4000, seed: int = 0) -> float:
    """Monte Carlo power of the one-sided exact sign-flip test (mean < 0 alternative for a negative
    effect) with n normal paired differences of mean `effect` and standard deviation `sd`: the share of
    simulated studies whose exact p (all 2^n sign patterns) is below alpha."""
    rng = np.random.default_rng(seed)
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * n)).reshape(n, -1)  # n x 2^n
    d = rng.normal(effect, sd, (sims, n)) * (-1.0 if effect < 0 else 1.0)  # test "greater" on |effect|
    null = np.abs(d) @ signs / n  # each simulated study's sign-flip null distribution of the mean
    obs = d.mean(axis=1, keepdims=True)
    p = (null >= obs - 1e-12).mean(axis=1)
    return float((p < alpha).mean())


def detectable_effect_sign_flip(n: int, sd: float, alpha: float, power: float) -> float | None:
    """The smallest |mean paired difference| the one-sided exact sign-flip test at level alpha detects with
    probability `power` from n normal differences of standard deviation sd (bisection on power_sign_flip;
    None when the test cannot reach alpha at all with n pairs, or n > 16)."""
    if n < 1 or n > 16 or min_exact_pvalue(n, 1) >= alpha or not sd > 0:
        return None
    lo, hi = 0.0, sd
    while power_sign_flip(n, hi, sd, alpha) < power:
        hi *= 2
        if hi > 64 * sd:
            return None
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power_sign_flip(n, mid, sd, alpha) < power else (lo, mid)
    return hi


def paired(a: Mapping[int, float | None], b: Mapping[int, float | None],
           confidence: float = CONFIDENCE) -> dict:
    """Compare a with b, paired by key (the seed): only seeds where both have a finite value count.

    Returns {diff_mean, ci95_low, ci95_high, n, p_value (paired t-test), p_exact (sign-flip),
    min_p_exact, b_mean, seeds}. diff = a - b. p-values None when n < 2; with zero spread in the
    differences the t-test is undefined (p_value None) and the interval has zero width.
    """
    seeds = sorted(s for s in a if s in b and _finite([a[s]]).size and _finite([b[s]]).size)
    xa = np.asarray([float(a[s]) for s in seeds], dtype=np.float64)
    xb = np.asarray([float(b[s]) for s in seeds], dtype=np.float64)
    d = xa - xb
    n = len(d)
    lo, hi = t_interval(d, confidence)
    p_t = None
    if n >= 2 and float(np.std(d, ddof=1)) > 0:
        p_t = float(sps.ttest_rel(xa, xb).pvalue)
    return {
        "diff_mean": float(np.mean(d)) if n else None,
        "ci95_low": lo,
        "ci95_high": hi,
        "n": n,
        "p_value": p_t,
        "p_exact": sign_flip_pvalue(d) if n >= 2 else None,
        "min_p_exact": min_exact_pvalue(n) if n >= 1 else None,
        "b_mean": float(np.mean(xb)) if n else None,
        "seeds": seeds,
    }


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for humans: `digits` significant digits, 'n/a' for None."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 10**digits or abs(x) < 10 ** -(digits + 1):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fmt_signed(x: float | None, digits: int = 3) -> str:
    """fmt(x) with an explicit sign for positive values ("+0.012", "-0.5", "0"): for differences."""
    s = fmt(x, digits)
    return f"+{s}" if x is not None and s not in ("n/a", "0") and x > 0 else s


def digits_apart(lo: float, hi: float, digits: int = 3, most: int = 6) -> int:
    """The fewest significant digits (at least `digits`, at most `most`) at which fmt tells lo from hi
    apart, so a tight interval does not print as `1 [0.999, 1]`. `digits` when lo == hi."""
    d = digits
    while d < most and lo != hi and fmt(lo, d) == fmt(hi, d):
        d += 1
    return d


def fmt_interval(mean: float, lo: float | None, hi: float | None, signed: bool = False,
                 digits: int = 3) -> str:
    """"mean [lo, hi]" with enough digits to tell the ends apart (digits_apart); "mean" alone when the
    interval is undefined. signed: "+"/"-" on every number (for differences)."""
    f = fmt_signed if signed else fmt
    if lo is None or hi is None:
        return f(mean, digits)
    d = digits_apart(lo, hi, digits)
    return f"{f(mean, d)} [{f(lo, d)}, {f(hi, d)}]"


def crosses_floor(lo: float | None, floor: float | None) -> bool:
    """Whether a t interval reaches below a quantity's physical floor (a wall time below 0 s, a kurtosis
    below 1): the symmetric t interval of a skewed, bounded quantity from few seeds says nothing then."""
    return lo is not None and floor is not None and lo < floor


def exact_floor_note(n: int) -> str:
    """What the exact sign-flip test can show with n pairs, in words: its smallest two-sided p-value is
    2/2^n, so below n = 6 it can never reach 0.05 whatever the data ("" when it can)."""
    if n < 1:
        return ""
    floor = min_exact_pvalue(n)
    if floor < 0.05:
        return ""
    return (f"with {n} paired seed{'s' if n != 1 else ''} the exact sign-flip test's smallest possible p-value "
            f"is 2/2^{n} = {fmt(floor, 2)}, so it cannot reach 0.05 whatever the data")


def verdict(metric_label: str, a: str, b: str, cmp: dict) -> str:
    """One plain sentence about `a` vs `b` on one metric that claims no more than `cmp` supports.

    A direction ("lowers" / "raises") is claimed only when the 95% interval of the paired difference
    excludes 0; otherwise the sentence says the interval includes 0. With n < 2 it says so and claims
    nothing. The exact test's p-value is quoted with its floor (2 / 2^n) so nobody reads p = 0.25 at
    n = 3 as evidence against a difference.
    """
    n = cmp["n"]
    if n == 0 and cmp.get("why_none"):
        return f"{metric_label} is not compared for {a} and {b}: {cmp['why_none']}"
    if n < 2 or cmp["ci95_low"] is None:
        return (f"not enough seeds to compare {a} with {b} on {metric_label} "
                f"(n={n} paired seeds; need at least 2)")
    lo, hi, m = cmp["ci95_low"], cmp["ci95_high"], cmp["diff_mean"]
    ci = f"95% CI {fmt(lo)}..{fmt(hi)}"
    exact = f"exact sign-flip p={fmt(cmp['p_exact'], 2)}"
    if cmp["p_exact"] is not None and cmp["min_p_exact"] is not None and cmp["min_p_exact"] >= 0.05:
        exact += f", which cannot go below {fmt(cmp['min_p_exact'], 2)} with n={n}"
    pt = "paired t undefined (no spread)"
    if cmp["p_value"] is not None:
        pt = f"paired t p={fmt(cmp['p_value'], 2)}"
    if lo > 0 or hi < 0:
        word = "raises" if m > 0 else "lowers"
        rel = ""
        b_mean = cmp.get("b_mean")
        if b_mean and abs(m) <= 10 * abs(b_mean):  # a percentage of a near-zero baseline means nothing
            rel = f", {abs(m) / abs(b_mean) * 100:.3g}% of {b}'s mean"
        caveat = ""
        if cmp.get("p_holm") is not None and cmp["p_holm"] >= 0.05:
            caveat = (f"; not significant after Holm's correction for the {cmp['n_tests']} comparisons "
                      f"of this study (adjusted p={fmt(cmp['p_holm'], 2)}), so treat it as a lead, not a finding")
        return f"{a} {word} {metric_label} by {fmt(abs(m))} vs {b}{rel} ({ci}, n={n}, {pt}; {exact}){caveat}"
    if lo == hi == 0:
        return f"no difference: {a} and {b} give identical {metric_label} on all n={n} seeds"
    return (f"no significant difference between {a} and {b} in {metric_label} at this scale ({ci} includes 0, "
            f"n={n}, {pt}; {exact})")


# ----------------------------------------------------------------------------- over a study's runs


def summarize(runs: Sequence[Mapping], metrics: Sequence[str], variants: Sequence[str]) -> dict:
    """{metric: {variant: mean_ci(values over that variant's ok runs)}}; failed runs do not count."""
    out: dict = {}
    for metric in metrics:
        out[metric] = {}
        for v in variants:
            vals = [r.get(metric) for r in runs if r["variant"] == v and r.get("status") == "ok"]
            out[metric][v] = mean_ci(vals)
    return out


def compare(runs: Sequence[Mapping], metrics: Sequence[str], variants: Sequence[str], baseline: str,
            labels: Mapping[str, str] | None = None, *, primary: Sequence[tuple[str, str]] = (),
            structural=None) -> list[dict]:
    """Every variant other than `baseline` against it, per metric, paired by seed:
    [{metric, a, b, family, diff_mean, ci95_low, ci95_high, n, p_value, p_exact, p_holm, test, verdict, ...}].

    family: "primary" for the (metric, variant) pairs in `primary` (decided by `confirm`, not here: no Holm
    p in this list), "structural" where `structural(metric, variant)` or `structural(metric, baseline)` says
    the difference holds by construction (not tested), else "exploratory": Holm over the exploratory family
    alone."""
    labels = labels or {}
    out = []
    if baseline not in variants:
        return out
    prim = set(primary)

    def by_seed(v: str, metric: str) -> dict:
        return {r["seed"]: r.get(metric) for r in runs if r["variant"] == v and r.get("status") == "ok"}

    pairs = [(m, v) for m in metrics for v in variants if v != baseline]
    cmps = [paired(by_seed(v, m), by_seed(baseline, m)) for m, v in pairs]
    for (m, v), c in zip(pairs, cmps, strict=True):
        c["family"] = ("primary" if (m, v) in prim else "structural"
                       if structural is not None and (structural(m, v) or structural(m, baseline)) else "exploratory")
        # no run of either arm has a value (a gate mean without gates), as against too few seeds
        ok = [[r for r in runs if r["variant"] == x and r.get("status") == "ok"] for x in (v, baseline)]
        has = [any(r.get(m) is not None for r in rs) for rs in ok]
        if c["n"] == 0 and all(ok) and not all(has):
            c["why_none"] = f"{' and '.join(x for x, h in zip((v, baseline), has) if not h)} has no such value"
    # Many metrics x variants are tested at once: about 1 in 20 intervals excludes 0 by chance alone.
    explo = [c for c in cmps if c["family"] == "exploratory"]
    for c, adj in zip(explo, holm([c["p_value"] for c in explo])):
        c["p_holm"], c["n_tests"] = adj, sum(c2["p_value"] is not None for c2 in explo)
    for c in cmps:
        c.setdefault("p_holm", None)
        c.setdefault("n_tests", None)
    for (metric, v), c in zip(pairs, cmps):
        label = labels.get(metric, metric)
        if c["family"] == "structural":
            zero = baseline if structural(metric, baseline) else v
            said = f"structural, not tested: {label} is 0 by construction for {zero}"
        elif c["family"] == "primary":
            said = f"primary hypothesis: decided in the confirmatory result ({verdict(label, v, baseline, c)})"
        else:
            said = "exploratory: " + verdict(label, v, baseline, c)
        out.append({
            "metric": metric, "a": v, "b": baseline, **c,
            "test": f"paired t-test (scipy.stats.ttest_rel); {EXACT_TEST} over all 2^n sign patterns; "
                    "p_holm: t-test p adjusted by Holm's step-down method over the exploratory family",
            "verdict": said,
        })
    return out


def confirm(runs: Sequence[Mapping], hypotheses: Sequence, baseline: str, alpha: float = 0.05) -> list[dict]:
    """The pre-registered primary hypotheses, each decided by its own one-sided test (exact sign-flip over all
    2^n sign patterns, or the paired t-test), Holm-corrected over the hypotheses alone at `alpha`.

    Each hypothesis (config.Hypothesis: name, metric, variant, direction, test) gives {name, metric, a, b,
    direction, test, diff_mean, ci95_low, ci95_high (two-sided t interval), n, seeds, p (one-sided), p_min
    (the smallest p its test can give with n pairs), p_holm, decision, sentence}: "confirmed" when the Holm
    p is below alpha; "refuted" when the two-sided 95% interval lies wholly on the other side of 0; else
    "not confirmed"."""
    rows = []
    for h in hypotheses:
        a = {r["seed"]: r.get(h.metric) for r in runs if r["variant"] == h.variant and r.get("status") == "ok"}
        b = {r["seed"]: r.get(h.metric) for r in runs if r["variant"] == baseline and r.get("status") == "ok"}
        c = paired(a, b)
        d = np.asarray([float(a[s]) - float(b[s]) for s in c["seeds"]], dtype=np.float64)
        alt = "less" if h.direction == "lower" else "greater"
        p = sign_flip_pvalue(d, alt) if h.test == "sign-flip" else one_sided_t_pvalue(d, alt)
        rows.append({"name": h.name, "metric": h.metric, "a": h.variant, "b": baseline, "direction": h.direction,
                     "test": "exact one-sided sign-flip" if h.test == "sign-flip" else "one-sided paired t",
                     "diff_mean": c["diff_mean"], "ci95_low": c["ci95_low"], "ci95_high": c["ci95_high"],
                     "n": c["n"], "seeds": c["seeds"], "p": p,
                     "p_min": min_exact_pvalue(c["n"], 1) if h.test == "sign-flip" and c["n"] else None})
    for r, adj in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = adj
        lo, hi = r["ci95_low"], r["ci95_high"]
        against = lo is not None and ((r["direction"] == "lower" and lo > 0) or
                                      (r["direction"] == "higher" and hi < 0))
        r["decision"] = "confirmed" if adj is not None and adj < alpha else "refuted" if against else "not confirmed"
        r["sentence"] = (f"{r['name']}: {r['a']} has a {r['direction']} {r['metric']} than {r['b']}: "
                         f"{r['decision']} (difference {fmt_interval(r['diff_mean'], lo, hi, signed=True)}, "
                         f"n={r['n']}, {r['test']} p={fmt(r['p'], 2)}, Holm p={fmt(adj, 2)} over "
                         f"{len(rows)} hypotheses at alpha {fmt(alpha)})")
    return rows


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error control); None entries stay None and do not
    count as tests. adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) over the sorted p-values."""
    idx = [i for i, p in enumerate(p_values) if p is not None and math.isfinite(p)]
    m = len(idx)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out
