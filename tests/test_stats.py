"""Study statistics against hand-computed values, scipy, and a brute-force enumeration of sign flips."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from quietgpt import stats


def brute_sign_flip(d: list[float]) -> float:
    """Two-sided exact sign-flip p-value by enumerating all 2^n patterns (independent of scipy)."""
    obs = abs(sum(d)) / len(d)
    hits = 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        m = abs(sum(s * x for s, x in zip(signs, d, strict=True))) / len(d)
        hits += m >= obs - 1e-12
    return hits / 2 ** len(d)


def test_mean_ci_hand_computed():
    # x = 1, 2, 3, 4: mean 2.5, sd = sqrt(5/3), t_{3, 0.975} = 3.182446305284263
    r = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert r["n"] == 4 and r["mean"] == pytest.approx(2.5)
    assert r["ci95_low"] == pytest.approx(2.5 - half, rel=1e-12)
    assert r["ci95_high"] == pytest.approx(2.5 + half, rel=1e-12)


def test_mean_ci_matches_scipy_interval():
    x = np.array([3.1, 2.7, 4.4, 3.9, 3.0])
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    r = stats.mean_ci(list(x))
    assert (r["ci95_low"], r["ci95_high"]) == pytest.approx((lo, hi), rel=1e-12)


def test_mean_ci_single_and_missing_values():
    r = stats.mean_ci([2.0])
    assert r == {"mean": 2.0, "ci95_low": None, "ci95_high": None, "n": 1, "sd": None}
    r = stats.mean_ci([None, float("nan"), 1.0, 3.0])  # failed runs carry None; NaN is not a value
    assert r["n"] == 2 and r["mean"] == 2.0
    assert stats.mean_ci([])["mean"] is None


def test_paired_matches_scipy_and_hand_values():
    a = {0: 10.0, 1: 12.0, 2: 9.0, 3: 11.5}
    b = {0: 11.0, 1: 14.0, 2: 9.5, 3: 13.0}
    c = stats.paired(a, b)
    d = np.array([a[s] - b[s] for s in range(4)])  # -1, -2, -0.5, -1.5
    assert c["n"] == 4 and c["diff_mean"] == pytest.approx(-1.25)
    assert c["p_value"] == pytest.approx(sps.ttest_rel(list(a.values()), list(b.values())).pvalue, rel=1e-12)
    lo, hi = sps.t.interval(0.95, 3, loc=d.mean(), scale=sps.sem(d))
    assert (c["ci95_low"], c["ci95_high"]) == pytest.approx((lo, hi), rel=1e-12)
    # all four differences negative: only the all-negative and all-positive patterns are as extreme
    assert c["p_exact"] == pytest.approx(2 / 16)
    assert c["min_p_exact"] == pytest.approx(2 / 16)


@pytest.mark.parametrize("d", [[1.0, -2.0, 3.0, 0.5], [0.3, 0.1, -0.2], [5.0, 4.0, 3.0, -0.1, 2.0, 1.0]])
def test_sign_flip_matches_enumeration(d):
    assert stats.sign_flip_pvalue(np.array(d)) == pytest.approx(brute_sign_flip(d), abs=1e-12)


def test_sign_flip_hand_value():
    # [1, -2, 3, 0.5]: 10 of the 16 sign patterns have |sum| >= 2.5 (enumerated by hand)
    assert stats.sign_flip_pvalue(np.array([1.0, -2.0, 3.0, 0.5])) == pytest.approx(10 / 16)


def test_pairing_is_by_seed_and_skips_failed():
    a = {0: 1.0, 1: None, 2: 3.0, 5: 9.0}  # seed 1 failed; seed 5 has no partner
    b = {2: 1.0, 0: 0.0, 1: 4.0}
    c = stats.paired(a, b)
    assert c["seeds"] == [0, 2] and c["n"] == 2 and c["diff_mean"] == pytest.approx(1.5)


def test_verdict_claims_direction_only_when_ci_excludes_zero():
    a = {0: 10.0, 1: 12.0, 2: 9.0}
    b = {0: 20.0, 1: 22.5, 2: 18.5}
    c = stats.paired(a, b)
    assert c["ci95_high"] < 0
    v = stats.verdict("weight kurtosis max", "softmax1", "softmax", c)
    assert v.startswith("softmax1 lowers weight kurtosis max by 10 vs softmax")
    assert "n=3" in v and "cannot go below 0.25" in v  # the exact test's floor at n = 3 is said out loud

    c = stats.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 1.0, 2: 3.2})
    assert c["ci95_low"] < 0 < c["ci95_high"]
    v = stats.verdict("ppl", "sink", "softmax", c)
    assert v.startswith("no significant difference between sink and softmax in ppl at this scale")
    assert "includes 0" in v
    assert "lowers" not in v and "raises" not in v

    c = stats.paired({0: 1.0}, {0: 2.0})
    assert stats.verdict("ppl", "sink", "softmax", c).startswith("not enough seeds")


def test_identical_values_and_zero_spread():
    c = stats.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert c["diff_mean"] == 0 and c["p_value"] is None and c["p_exact"] == 1.0
    assert stats.verdict("ppl", "a", "b", c).startswith("no difference")
    c = stats.paired({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # constant shift: zero-width interval at 1
    assert c["ci95_low"] == c["ci95_high"] == 1.0 and c["p_value"] is None
    assert "raises ppl by 1 vs b, 66.7% of b's mean" in stats.verdict("ppl", "a", "b", c)
    c = stats.paired({0: 0.2, 1: 0.3, 2: 0.25}, {0: 1e-9, 1: 2e-9, 2: 0.0})  # no percentage of a ~0 baseline
    v = stats.verdict("mass", "a", "b", c)
    assert v.startswith("a raises mass by 0.25 vs b (95% CI") and "b's mean" not in v


def test_summarize_and_compare_over_runs():
    runs = [
        {"variant": v, "seed": s, "status": "ok", "m": base + s + (0.5 if v == "softmax1" else 0.0)}
        for v, base in (("softmax", 1.0), ("softmax1", 1.0)) for s in range(3)
    ] + [{"variant": "softmax1", "seed": 3, "status": "failed", "m": None}]
    summ = stats.summarize(runs, ["m"], ["softmax", "softmax1"])
    assert summ["m"]["softmax"]["mean"] == pytest.approx(2.0) and summ["m"]["softmax1"]["n"] == 3
    (cmp,) = stats.compare(runs, ["m"], ["softmax", "softmax1"], "softmax", {"m": "the metric"})
    assert cmp["a"] == "softmax1" and cmp["b"] == "softmax" and cmp["diff_mean"] == pytest.approx(0.5)
    assert cmp["ci95_low"] == pytest.approx(0.5) and "raises the metric" in cmp["verdict"]
    for key in ("metric", "a", "b", "diff_mean", "ci95_low", "ci95_high", "p_value", "test", "verdict"):
        assert key in cmp


def test_holm_against_hand_computed_and_bonferroni_bound():
    from quietgpt.stats import holm

    # sorted p: 0.01, 0.02, 0.04 (m = 3): 0.03, max(0.03, 0.04) = 0.04, max(0.04, 0.04) = 0.04
    assert holm([0.04, 0.01, None, 0.02]) == pytest.approx([0.04, 0.03, None, 0.04])
    rng = np.random.default_rng(0)
    p = list(rng.uniform(0, 0.2, 12))
    adj = holm(p)
    for raw, a in zip(p, adj):
        assert raw <= a <= min(1.0, 12 * raw) + 1e-12  # between raw and Bonferroni
    order = np.argsort(p)
    assert all(adj[order[i]] <= adj[order[i + 1]] for i in range(11))  # monotone in the raw order


def test_verdict_flags_claims_that_do_not_survive_holm():
    from quietgpt.stats import paired, verdict

    c = paired({0: 1.10, 1: 1.21, 2: 1.32}, {0: 1.0, 1: 1.1, 2: 1.2})  # CI of the difference excludes 0
    assert c["ci95_low"] > 0
    c.update(p_holm=0.4, n_tests=20)
    v = verdict("loss", "softmax1", "softmax", c)
    assert v.startswith("softmax1 raises loss") and "Holm" in v and "20 comparisons" in v
    c.update(p_holm=0.01)
    assert "Holm" not in verdict("loss", "softmax1", "softmax", c)


def test_interval_formatting_and_the_exact_floor_in_words():
    # ends that agree to 3 significant digits get more, until they differ ("1 [0.999, 1]" is the bug)
    assert stats.digits_apart(0.99991, 1.00012) == 4  # "0.9999" vs "1"
    assert stats.digits_apart(1.00012, 1.00019) == 5  # "1.0001" vs "1.0002"
    assert stats.fmt_interval(1.00015, 1.00012, 1.00019) == "1.0002 [1.0001, 1.0002]"
    assert stats.fmt_interval(-0.0068, -0.0117, -0.002, signed=True) == "-0.0068 [-0.0117, -0.002]"
    assert stats.fmt_interval(0.5, None, None, signed=True) == "+0.5"
    assert stats.fmt_signed(0.0) == "0" and stats.fmt_signed(None) == "n/a"
    assert stats.crosses_floor(-69.1, 0.0) and not stats.crosses_floor(0.2, 0.0)
    assert not stats.crosses_floor(-1.0, None)  # a quantity without a floor (a difference)
    # 2 / 2^n: 0.5 at n = 2, 0.25 at n = 3, 0.0625 at n = 5, below 0.05 from n = 6 on
    assert "2/2^2 = 0.5" in stats.exact_floor_note(2)
    assert "2/2^3 = 0.25" in stats.exact_floor_note(3)
    assert "2/2^5 = 0.062" in stats.exact_floor_note(5)
    assert stats.exact_floor_note(6) == ""  # 0.03125: the test can reach 0.05, nothing to warn about
    c = stats.paired({0: 1.0, 1: 2.0}, {0: 3.0, 1: 5.0})
    assert "cannot go below 0.5 with n=2" in stats.verdict("ppl", "a", "b", c)


def test_a_metric_an_arm_does_not_have_is_said_so_not_blamed_on_seeds():
    """gate_mean exists only for gated variants: comparing two ungated ones is 'not compared', not 'n=0'."""
    runs = [{"variant": v, "seed": s, "status": "ok", "gate_mean": (0.3 + s / 10 if v == "gated" else None),
             "val_loss": 2.0 + s / 10 + (v == "gated") * 0.01} for v in ("softmax", "softmax1", "gated")
            for s in range(3)]
    cmps = {(c["metric"], c["a"]): c for c in stats.compare(runs, ["gate_mean", "val_loss"],
                                                             ["softmax", "softmax1", "gated"], "softmax")}
    assert cmps[("gate_mean", "softmax1")]["verdict"].endswith("softmax1 and softmax has no such value")
    assert cmps[("gate_mean", "gated")]["verdict"].endswith("softmax has no such value")
    assert cmps[("val_loss", "gated")]["n"] == 3
