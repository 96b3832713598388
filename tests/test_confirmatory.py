"""Pre-registered primary hypotheses: the one-sided tests against hand-computed values, Holm over the primary
family alone (a hand-computed family), structural comparisons kept out of every family, fresh seeds, the power
printout against simulation, a study whose hypotheses changed refusing to resume, and the report opening with
the confirmatory result."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from quietgpt import report, study
from quietgpt.cli import main
from quietgpt.config import Hypothesis, StudyConfig
from quietgpt.errors import ConfigError, QuietError
from quietgpt.measurement.registry import zero_by_construction
from quietgpt.stats import (
    compare,
    confirm,
    detectable_effect_sign_flip,
    detectable_effect_t,
    holm,
    min_exact_pvalue,
    one_sided_t_pvalue,
    power_sign_flip,
    sign_flip_pvalue,
)
from quietgpt.study.preregistration import describe, git_record
from quietgpt.utils.atomic import atomic_write_json
from test_report import make_fake_study


def runs_from(values: dict[str, list[float]], metric: str = "m") -> list[dict]:
    return [{"variant": v, "seed": 100 + s, "status": "ok", metric: x} for v, xs in values.items()
            for s, x in enumerate(xs)]


def test_one_sided_sign_flip_by_hand():
    """All 5 differences negative: only the all-negative sign pattern (of 32) has a mean that low: p = 1/32.
    One of them positive and smallest: that pattern and the all-negative one, p = 2/32."""
    assert sign_flip_pvalue(np.array([-1.0, -2, -3, -1, -2]), "less") == pytest.approx(1 / 32)
    assert sign_flip_pvalue(np.array([0.5, -2, -3, -1, -2]), "less") == pytest.approx(2 / 32)
    assert sign_flip_pvalue(np.array([-1.0, -2, -3, -1, -2]), "greater") == pytest.approx(1.0)
    assert min_exact_pvalue(12, 1) == pytest.approx(1 / 4096)
    d = np.array([-1.2, -0.3, -2.0, 0.4, -1.1, -0.9])
    assert one_sided_t_pvalue(d, "less") == pytest.approx(sps.ttest_1samp(d, 0, alternative="less").pvalue)


def test_confirm_decides_each_hypothesis_with_holm_over_the_primary_family_alone():
    """Three hypotheses on 6 seeds: a clear effect (p = 1/64), one in the opposite direction (refuted) and
    noise. Holm over these three by hand: 3 * 1/64, then max(that, 2 * p2), ..."""
    rng = np.random.default_rng(0)
    base = rng.normal(1.4, 0.1, 6)
    runs = runs_from({"softmax": list(base), "softmax1": list(base - 0.3), "sink": list(base + 0.3),
                      "gated": list(base + rng.normal(0, 0.1, 6))})
    hyps = [Hypothesis("H1", "m", "softmax1"), Hypothesis("H2", "m", "sink"), Hypothesis("H3", "m", "gated")]
    out = {r["name"]: r for r in confirm(runs, hyps, "softmax", alpha=0.05)}
    p = [out[h]["p"] for h in ("H1", "H2", "H3")]
    assert p[0] == pytest.approx(1 / 64) and p[1] == pytest.approx(1.0)
    assert [out[h]["p_holm"] for h in ("H1", "H2", "H3")] == pytest.approx(holm(p))
    assert out["H1"]["p_holm"] == pytest.approx(3 / 64)
    assert out["H1"]["decision"] == "confirmed" and out["H2"]["decision"] == "refuted"
    assert out["H3"]["decision"] in ("not confirmed", "refuted") and out["H1"]["seeds"] == list(range(100, 106))
    assert out["H1"]["diff_mean"] == pytest.approx(-0.3) and "confirmed" in out["H1"]["sentence"]
    t = confirm(runs, [Hypothesis("T", "m", "softmax1", test="t")], "softmax")[0]
    assert t["p"] is None or t["test"] == "one-sided paired t"  # an exact constant shift has no spread


def test_structural_comparisons_enter_no_family_and_primary_ones_leave_the_exploratory_one():
    runs = [{"variant": v, "seed": s, "status": "ok", "unassigned_mass_mean": (0.0 if v == "softmax" else 0.05 + s),
             "m": float(s + (v == "softmax1")), "k": float(s * (v == "sink"))}
            for v in ("softmax", "softmax1", "sink") for s in range(4)]
    cmps = compare(runs, ["unassigned_mass_mean", "m", "k"], ["softmax", "softmax1", "sink"], "softmax",
                   primary=[("m", "softmax1")], structural=zero_by_construction)
    fam = {(c["metric"], c["a"]): c["family"] for c in cmps}
    assert fam[("unassigned_mass_mean", "softmax1")] == fam[("unassigned_mass_mean", "sink")] == "structural"
    assert fam[("m", "softmax1")] == "primary" and fam[("m", "sink")] == fam[("k", "softmax1")] == "exploratory"
    explo = [c for c in cmps if c["family"] == "exploratory"]
    assert all(c["n_tests"] == sum(e["p_value"] is not None for e in explo) for c in explo)
    assert all(c["p_holm"] is None for c in cmps if c["family"] != "exploratory")
    assert all(c["verdict"].startswith("structural, not tested") for c in cmps if c["family"] == "structural")


def test_seed_start_draws_fresh_seeds_and_hypotheses_are_checked():
    spec = study.resolve_spec("default", seeds=4, seed_start=100)
    assert spec.seeds == (100, 101, 102, 103)
    sc = StudyConfig.from_dict({"primary": [{"name": "H1", "metric": "ppl_ratio_w4a8", "variant": "softmax1"}]})
    assert sc.primary[0].direction == "lower" and sc.primary[0].test == "sign-flip"
    for bad, words in (({"name": "H1", "metric": "m", "variant": "v", "direction": "down"}, "direction"),
                       ({"name": "H1", "metric": "m", "variant": "v", "tset": "t"}, "study.primary.tset"),
                       ({"name": "H1", "metric": "m", "variant": "v", "sd": -1}, "sd")):
        with pytest.raises(ConfigError, match=words):
            StudyConfig.from_dict({"primary": [bad]})


def study_file(tmp_path: Path, variant: str = "softmax1", metric: str = "ppl_ratio_w4a8") -> Path:
    f = tmp_path / "confirm.toml"
    f.write_text(f'''[study]
base = "default"
variants = ["softmax", "softmax1", "sink"]
seeds = 2
seed_start = 50
quant = ["w4a8"]
[[study.primary]]
name = "H1"
metric = "{metric}"
variant = "{variant}"
direction = "lower"
sd = 0.1
''')
    return f


def test_a_hypothesis_must_name_a_compared_metric_and_a_fix(tmp_path):
    with pytest.raises(ConfigError, match="not one the study compares"):
        study.resolve_spec(str(study_file(tmp_path, metric="ppl_ratio_w8a8")))
    with pytest.raises(ConfigError, match="must be one of the arms"):
        study.resolve_spec(str(study_file(tmp_path, variant="softmax")))


def test_a_study_whose_hypothesis_changed_refuses_to_resume_even_with_force(tmp_path):
    spec = study.resolve_spec(str(study_file(tmp_path)))
    out = tmp_path / "s"
    out.mkdir()
    atomic_write_json(out / "study.json", {**spec.to_dict(), "preregistration": {"hypotheses_hash": "x"}})
    changed = str(study_file(tmp_path, variant="sink"))
    for force in (False, True):
        with pytest.raises(QuietError, match="other primary hypotheses"):
            study.run_study(out, changed, force=force, progress=False)
    assert json.loads((out / "study.json").read_text())["primary"][0]["variant"] == "softmax1"


def test_the_plan_prints_what_the_seeds_can_detect(tmp_path, capsys):
    assert main(["study", "--plan", "--preset", str(study_file(tmp_path)), "--seeds", "12"]) == 0
    out = capsys.readouterr().out
    assert "36 runs" in out and "seeds 50..61" in out and "2.4e-04 one-sided" in out
    assert "H1 (ppl_ratio_w4a8, sign-flip): level 0.05" in out and "prior sd 0.1" in out and "90% power" in out


def test_detectable_effects_have_the_power_they_claim():
    """At the effect detectable_effect_t gives, a simulated one-sided t-test rejects ~90% of the time; the
    exact test's detectable effect likewise (its own Monte Carlo, checked against a fresh one)."""
    n, sd, alpha = 10, 12.5, 0.0125
    eff = detectable_effect_t(n, sd, alpha, 0.9)
    rng = np.random.default_rng(1)
    d = rng.normal(-eff, sd, (20000, n))
    p = sps.ttest_1samp(d, 0, axis=1, alternative="less").pvalue
    assert np.mean(p < alpha) == pytest.approx(0.9, abs=0.01)
    e2 = detectable_effect_sign_flip(n, sd, alpha, 0.9)
    assert e2 > eff * 0.95  # the exact test needs at least about as large an effect
    assert power_sign_flip(n, -e2, sd, alpha, sims=8000, seed=7) == pytest.approx(0.9, abs=0.02)
    assert detectable_effect_sign_flip(5, sd, 0.0125, 0.9) is None  # 1/32 > 0.0125: it can never reject


def test_the_report_opens_with_the_confirmatory_result(tmp_path):
    spec = make_fake_study(tmp_path, seeds=6)
    spec = dataclasses.replace(spec, primary=(Hypothesis("H1", "ppl_ratio_w4a8", "softmax1", sd=0.1),), alpha=0.05)
    atomic_write_json(tmp_path / "study.json", {**spec.to_dict(), "preregistration": None})
    results = study.collect(tmp_path)
    h = results["confirmatory"]["hypotheses"][0]
    assert h["name"] == "H1" and h["n"] == 6 and h["decision"] in ("confirmed", "not confirmed", "refuted")
    assert results["confirmatory"]["power"][0]["name"] == "H1"
    md = report.write_report(tmp_path)["md"].read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[0] == "## Confirmatory result (pre-registered)" and heads[1] == "## Answer (exploratory)"
    assert h["decision"].upper() in md and "No pre-registration record" in md
    assert "Effects against softmax (exploratory)" in md


def test_the_preregistration_record_names_the_commit_and_checks_the_first_run(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    f = study_file(repo)
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", f.name], check=True)
    subprocess.run([*git, "commit", "-qm", "hypotheses"], check=True)
    rec = git_record(f)
    assert rec["clean"] and len(rec["commit"]) == 40
    prereg = {"hypotheses_hash": "ab" * 32, "file": str(f), "git": rec}
    assert "after it" in describe(prereg, rec["committed_at"] + 10)
    assert "BEFORE that commit" in describe(prereg, rec["committed_at"] - 10)
    f.write_text(f.read_text() + "# changed\n")
    assert git_record(f)["clean"] is False
    assert git_record(tmp_path / "nowhere.toml") is None
