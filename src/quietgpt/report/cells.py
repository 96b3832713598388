"""How the report prints one number: a variant's mean, or a paired difference with its verdict symbol.

Three things a plain `fmt(mean) [lo, hi]` gets wrong, fixed here once for the tables, the forest plot
and the answer:

* zero by construction: softmax and gated attention put all of every row's weight on keys, so their
  unassigned mass is 0 up to float rounding (1 - a float32 row sum: ~1e-9). It prints as 0, not
  -2.74e-11. The registry does not mark this yet, so it is decided here from the variant
  (nn/variants.py's NULL_VARIANTS can leave mass; every other known variant cannot) and, for any
  variant, from values below ZERO_TOL in absolute value.
* quantization penalties: ppl_q / ppl_fp is 1.0001 or so; printed as a ratio it rounds to `1 [0.999, 1]`.
  It prints as the penalty in percent, (ratio - 1) * 100, with enough digits to tell the ends apart,
  and its differences in percentage points.
* intervals below a physical floor: with 2 seeds the t interval is mean -+ 12.7 sd, so a wall time
  prints as `42 [-69.1, 153]`. A mean whose interval reaches below the quantity's floor (FLOOR_BY_UNIT)
  prints with "CI uninformative" instead of the impossible interval; so does an attention mass whose
  interval reaches above 1 (CEILING_BY_UNIT).
"""

from __future__ import annotations

from quietgpt.measurement.registry import zero_by_construction
from quietgpt.nn.variants import NULL_VARIANTS, RENORMALISED, VARIANTS
from quietgpt.stats import crosses_floor, fmt, fmt_interval, fmt_signed

MASS_METRIC = "unassigned_mass_mean"
CAN_LEAVE_MASS = NULL_VARIANTS  # their rows need not sum to 1 (nn/variants.py says why for each)
CANNOT_LEAVE_MASS = tuple(v for v in VARIANTS if v not in CAN_LEAVE_MASS)  # softmax, gated
ZERO_TOL = 1e-6  # float32 row sums of <= a few thousand probabilities are exact to ~1e-7
CONSTRUCTION_TOL = 1e-4  # above this a "cannot leave mass" variant's value is shown as measured (a bug)
PENALTY_PREFIX = "ppl_ratio_"  # registry keys of quantization penalties (ppl_q / ppl_fp)
ALPHA = 0.05  # family-wise error rate of Holm's correction


def subtracts_mass(arm: str) -> bool:
    """Is the arm's unassigned mass subtracted and then renormalised away (diff: rows sum to 1 - lambda, the
    per-head RMSNorm restores the scale), so not a head abstaining? An arm "variant+optimizer" counts as its
    variant."""
    return arm.partition("+")[0] in RENORMALISED

# The smallest value a metric of each unit can take; used only to spot impossible interval ends.
# Not "probability": clipped softmax with zeta > 1 can over-assign a row, making its unassigned mass < 0.
FLOOR_BY_UNIT = {"s": 0.0, "tokens/s": 0.0, "absolute value": 0.0, "nats/token": 0.0, "nats": 0.0,
                 "ratio": 0.0, "perplexity": 1.0, "kurtosis": 1.0,  # Pearson kurtosis >= 1, exp(CE >= 0) >= 1
                 "share": 0.0, "count": 0.0}
CEILING_BY_UNIT = {"probability": 1.0}  # an attention mass above 1 is impossible (rows sum to >= 0)

# One symbol per verdict (the effects table and the legend under it).
SYMBOLS = {"up": "▲", "down": "▼", "lead_up": "△", "lead_down": "▽", "none": "·", "same": "=", "na": "–"}
SYMBOL_LEGEND = ("▲/▼ higher/lower than the baseline, significant after Holm's correction over the study's "
                 "exploratory comparisons; △/▽ the 95% interval excludes 0 but the difference does not survive "
                 "the correction (a lead, not a finding); · the interval includes 0; = identical on every seed; "
                 "– fewer than 2 paired seeds.")


def is_penalty(metric: str) -> bool:
    return metric.startswith(PENALTY_PREFIX)


def quant_name(metric: str) -> str:
    return metric[len(PENALTY_PREFIX):]


def label(metric: str, desc: dict) -> str:
    """The row label: the registry's, except penalties, which the report shows in percent."""
    if is_penalty(metric):
        return f"{quant_name(metric)} penalty (% perplexity over FP)"
    return desc.get("label", metric)


def scale(metric: str) -> float:
    """Factor from the stored value (or difference) to the printed one: ratios -> percent (points)."""
    return 100.0 if is_penalty(metric) else 1.0


def _near_zero(*xs: float | None) -> bool:
    return all(x is not None and abs(x) < ZERO_TOL for x in xs)


def summary_cell(metric: str, desc: dict, variant: str, s: dict | None) -> str:
    """A variant's mean [95% CI] over seeds for the summary table (see the module docstring)."""
    if not s or s.get("mean") is None:
        return "n/a"
    m, lo, hi, n = s["mean"], s.get("ci95_low"), s.get("ci95_high"), s.get("n")
    if metric == MASS_METRIC and (
            (zero_by_construction(metric, variant) and abs(m) < CONSTRUCTION_TOL) or _near_zero(m, lo, hi)):
        return "0 (by construction)" if zero_by_construction(metric, variant) else "0"
    if lo is None or hi is None:
        return f"{_shown(metric, m)} (n={n}, no CI)"
    unit = desc.get("unit", "")
    if crosses_floor(lo, FLOOR_BY_UNIT.get(unit)) or hi > CEILING_BY_UNIT.get(unit, float("inf")):
        return f"{_shown(metric, m)} (n={n}: 95% CI uninformative)"
    if is_penalty(metric):
        return fmt_interval((m - 1) * 100, (lo - 1) * 100, (hi - 1) * 100, signed=True) + "%"
    return fmt_interval(m, lo, hi)


def baseline_value(metric: str, variant: str, s: dict | None) -> str:
    """A variant's mean alone, as the tables print it (0 by construction, penalties in percent)."""
    m = (s or {}).get("mean")
    if m is None:
        return "n/a"
    if metric == MASS_METRIC and (abs(m) < ZERO_TOL or (zero_by_construction(metric, variant)
                                                       and abs(m) < CONSTRUCTION_TOL)):
        return "0"
    return _shown(metric, m)


def _shown(metric: str, x: float) -> str:
    return fmt_signed((x - 1) * 100) + "%" if is_penalty(metric) else fmt(x)


def symbol_key(c: dict) -> str:
    """The verdict of one comparison as a SYMBOLS key: significant after Holm, lead, none, same, na."""
    lo, hi, m = c.get("ci95_low"), c.get("ci95_high"), c.get("diff_mean")
    if (c.get("n") or 0) < 2 or lo is None or hi is None or m is None:
        return "na"
    if lo == hi == 0:
        return "same"
    if not (lo > 0 or hi < 0):
        return "none"
    up = m > 0
    if significant(c):
        return "up" if up else "down"
    return "lead_up" if up else "lead_down"


def significant(c: dict) -> bool:
    """Holm-adjusted p < ALPHA (implies the interval excludes 0: Holm only raises p-values)."""
    p = c.get("p_holm")
    return p is not None and p < ALPHA and c.get("ci95_low") is not None and (c["ci95_low"] > 0
                                                                              or c["ci95_high"] < 0)


def effect_cell(metric: str, c: dict) -> str:
    """A paired difference to the baseline, "diff [lo, hi] symbol", in the report's units."""
    if zero_by_construction(metric, c["a"]) and zero_by_construction(metric, c["b"]):
        return "0 (by construction) ="
    if c.get("family") == "structural":  # the baseline's (or the variant's) value is 0 by definition: not tested
        m = c.get("diff_mean")
        return f"{fmt_signed(m * scale(metric)) if m is not None else 'n/a'} (structural)"
    m, lo, hi = c.get("diff_mean"), c.get("ci95_low"), c.get("ci95_high")
    if m is None:
        return f"n/a {SYMBOLS['na']}"
    k = scale(metric)
    if (c.get("n") or 0) < 2:
        return f"{fmt_signed(m * k)} (n={c.get('n') or 0}) {SYMBOLS['na']}"
    text = fmt_interval(m * k, None if lo is None else lo * k, None if hi is None else hi * k, signed=True)
    return f"{text}{' pp' if is_penalty(metric) else ''} {SYMBOLS[symbol_key(c)]}"


def effect_unit(metric: str, desc: dict) -> str:
    """The unit of a difference as printed (forest plot axes)."""
    return "percentage points" if is_penalty(metric) else desc.get("unit", "")
