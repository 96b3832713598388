"""The report at a glance: the answer and the forest plot first, the details folded, honest numbers and
figures. Against hand-computed cells, planted comparisons, the figures' own axes, and (when chromium is
installed) the page's layout in a headless browser at 1280 x 800."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from quietgpt import report, study
from quietgpt.report import answer as A
from quietgpt.report import cells as C
from quietgpt.report import plots as P
from test_report import make_fake_study

# ----------------------------------------------------------------------------- cells


def test_zero_by_construction_prints_0():
    desc = {"unit": "probability"}
    s = {"mean": -2.74e-11, "ci95_low": -3.0e-9, "ci95_high": 2.95e-9, "n": 2}
    assert C.summary_cell("unassigned_mass_mean", desc, "softmax", s) == "0 (by construction)"
    assert C.summary_cell("unassigned_mass_mean", desc, "gated", s) == "0 (by construction)"
    # a variant that can leave mass but left none measurable: 0, without the claim
    assert C.summary_cell("unassigned_mass_mean", desc, "clipped", s) == "0"
    # a variant the report does not know, with a real value: printed as measured, never hidden
    s2 = {"mean": 0.3, "ci95_low": 0.2, "ci95_high": 0.4, "n": 3}
    assert C.summary_cell("unassigned_mass_mean", desc, "mine", s2) == "0.3 [0.2, 0.4]"
    # both sides zero by construction: the difference is 0, not 1e-11
    c = {"metric": "unassigned_mass_mean", "a": "gated", "b": "softmax", "diff_mean": 1.2e-11,
         "ci95_low": -3e-9, "ci95_high": 3e-9, "n": 2}
    assert C.effect_cell("unassigned_mass_mean", c) == "0 (by construction) ="
    # the variant sets come from attention.py: every null variant and clipped can leave mass
    assert set(C.CAN_LEAVE_MASS) == {"softmax1", "softmax_n", "sink", "clipped", "softpick", "sigmoid", "kvbias",
                                     "diff"}
    assert set(C.CANNOT_LEAVE_MASS) == {"softmax", "gated", "outgate"}  # gates scale outputs, not weights


def test_interval_below_a_floor_is_called_uninformative():
    # 2 seeds of wall time 42 +- 8.8: t_{1, 0.975} = 12.706 makes the interval 42 -+ 79: below 0 s
    s = {"mean": 42.0, "ci95_low": -69.1, "ci95_high": 153.0, "n": 2}
    assert C.summary_cell("wall_s", {"unit": "s"}, "softmax", s) == "42 (n=2: 95% CI uninformative)"
    # a kurtosis cannot go below 1 (Pearson); 0.5 is impossible, 1.5 is not
    k = {"unit": "kurtosis"}
    assert "uninformative" in C.summary_cell("act_kurtosis_mean", k, "a", {"mean": 3.0, "ci95_low": 0.5,
                                                                          "ci95_high": 5.5, "n": 2})
    assert C.summary_cell("act_kurtosis_mean", k, "a", {"mean": 3.0, "ci95_low": 1.5, "ci95_high": 4.5,
                                                        "n": 3}) == "3 [1.5, 4.5]"
    # an attention mass above 1 is impossible too
    assert "uninformative" in C.summary_cell("unassigned_mass_mean", {"unit": "probability"}, "clipped",
                                             {"mean": 0.82, "ci95_low": 0.47, "ci95_high": 1.17, "n": 2})


def test_quantization_penalty_prints_in_percent_with_enough_digits():
    desc = {"unit": "ratio"}
    s = {"mean": 1.000123, "ci95_low": 0.99998, "ci95_high": 1.00027, "n": 3}
    # (1.000123 - 1) * 100 = 0.0123 %, ends -0.002 % and +0.027 %: not "1 [1, 1]"
    assert C.summary_cell("ppl_ratio_w8a8", desc, "softmax", s) == "+0.0123 [-0.002, +0.027]%"
    assert C.label("ppl_ratio_w8a8", {"label": "w8a8 / FP perplexity"}) == "w8a8 penalty (% perplexity over FP)"
    c = {"metric": "ppl_ratio_w8a8", "a": "softmax1", "b": "softmax", "diff_mean": -0.00025,
         "ci95_low": -0.0006, "ci95_high": 0.0001, "n": 3, "p_holm": 0.9}
    assert C.effect_cell("ppl_ratio_w8a8", c) == "-0.025 [-0.06, +0.01] pp ·"


@pytest.mark.parametrize("c, key", [
    ({"n": 3, "diff_mean": -1.0, "ci95_low": -1.5, "ci95_high": -0.5, "p_holm": 0.01}, "down"),
    ({"n": 3, "diff_mean": 1.0, "ci95_low": 0.5, "ci95_high": 1.5, "p_holm": 0.01}, "up"),
    ({"n": 3, "diff_mean": 1.0, "ci95_low": 0.5, "ci95_high": 1.5, "p_holm": 0.3}, "lead_up"),
    ({"n": 3, "diff_mean": -1.0, "ci95_low": -1.5, "ci95_high": -0.5, "p_holm": None}, "lead_down"),
    ({"n": 3, "diff_mean": 0.1, "ci95_low": -0.5, "ci95_high": 0.7, "p_holm": 1.0}, "none"),
    ({"n": 3, "diff_mean": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "p_holm": None}, "same"),
    ({"n": 1, "diff_mean": 0.3, "ci95_low": None, "ci95_high": None}, "na"),
])
def test_one_symbol_per_verdict(c, key):
    assert C.symbol_key(c) == key
    assert C.significant(c) == (key in ("up", "down"))  # significant = survives Holm, nothing else


# ----------------------------------------------------------------------------- the answer


def _results(b_kurt=(3.1, 3.3), penalty=1.00005, comps=(), variants=("softmax", "softmax1"), w4=None) -> dict:
    """A minimal results dict: the baseline's means and planted comparisons (w4: a W4A8 penalty ratio too)."""
    summ = {"weight_kurtosis_max": {"softmax": {"mean": b_kurt[0]}},
            "act_kurtosis_mean": {"softmax": {"mean": b_kurt[1]}},
            "ppl_ratio_w8a8": {"softmax": {"mean": penalty}},
            **({"ppl_ratio_w4a8": {"softmax": {"mean": w4}}} if w4 else {}),
            "unassigned_mass_mean": {"softmax": {"mean": -1e-11}, "softmax1": {"mean": 0.02, "ci95_low": 0.01,
                                                                               "ci95_high": 0.03}}}
    metrics = {"val_loss": {"label": "validation loss", "higher_is_worse": True},
               "act_kurtosis_mean": {"label": "activation kurtosis mean", "higher_is_worse": True},
               "weight_kurtosis_max": {"label": "weight kurtosis max", "higher_is_worse": True},
               "ppl_ratio_w8a8": {"label": "w8a8 / FP perplexity", "higher_is_worse": True}}
    return {"config": {"baseline": "softmax", "variants": list(variants), "quant": ["w8a8", *(["w4a8"] if w4 else [])]},
            "summary": summ, "metrics": metrics, "comparisons": list(comps)}


def _cmp(metric, diff, lo, hi, p_holm, n=3, a="softmax1", b_mean=2.0):
    return {"metric": metric, "a": a, "b": "softmax", "diff_mean": diff, "ci95_low": lo, "ci95_high": hi,
            "n": n, "p_holm": p_holm, "n_tests": 4, "b_mean": b_mean}


def test_baseline_without_the_problem_says_nothing_to_remove():
    had, line = A.baseline_problem(_results())
    assert had is False
    assert "No:" in line and "nothing for a fix to remove" in line
    assert "0.005%" in line  # (1.00005 - 1) * 100, the W8A8 penalty, said in percent
    had, line = A.baseline_problem(_results(b_kurt=(3.1, 25.0), penalty=1.12))
    assert had is True and line.startswith("Did softmax have the problem? Yes:")
    assert "activation kurtosis mean 25 above 10" in line and "w8a8 12% perplexity (at least 10% under w8a8)" in line
    had, line = A.baseline_problem(_results(b_kurt=(3.1, 12.0), penalty=1.002))  # heavy tails, cheap 8-bit
    assert had is True and "Partly" in line


def test_the_problem_is_judged_from_every_penalty_measured():
    """Tried as a new user would: a 59% W4A8 penalty beside a cheap W8A8 and calm kurtosis is a problem (the
    old answer said "No" from W8A8 alone, listing the 59% in the same sentence)."""
    had, line = A.baseline_problem(_results(penalty=1.003, w4=1.59))
    assert had is True and "Yes, in quantization" in line
    assert "w4a8 59% perplexity" in line and "w8a8 0.3%" in line and "under w4a8" in line
    had, line = A.baseline_problem(_results(penalty=1.003, w4=1.05))
    assert had is False and "each under 10%" in line


def test_answer_claims_only_what_survives_holm():
    lead = _cmp("val_loss", -0.007, -0.012, -0.002, p_holm=0.4)
    noise = _cmp("act_kurtosis_mean", 0.5, -0.3, 1.3, p_holm=1.0)
    r = _results(comps=[lead, noise])
    line = A.fix_line(r, "softmax1")
    assert line.startswith("softmax1 (exploratory): heads abstain: 2% [1, 3] of attention on nothing")
    assert "no difference survives correction (2 metrics compared)" in line
    # every direction word comes with its number
    assert "leads that do not survive the correction: validation loss lower by 0.007 (better)" in line
    assert "significant after" not in line
    assert "no outlier or quantization difference survives Holm's correction" in A.short_answer(r, False)
    assert "nothing to remove" in A.short_answer(r, False)

    found = _cmp("act_kurtosis_mean", -1.0, -1.4, -0.6, p_holm=0.01, b_mean=4.0)
    r = _results(comps=[lead, found])
    line = A.fix_line(r, "softmax1")
    assert "significant after Holm's correction: lowers activation kurtosis mean by 1, 25% of the baseline " \
           "(better)" in line
    assert "no other difference survives correction (1 more metrics)" in line
    assert "softmax1 activation kurtosis mean lower by 1 (better)" in A.short_answer(r, True)
    assert A.short_answer(r, True).startswith("Short answer (exploratory):")


def test_two_seed_report_states_the_true_exact_floor(tmp_path):
    make_fake_study(tmp_path, seeds=2)
    study.collect(tmp_path)
    md = report.write_report(tmp_path)["md"].read_text()
    assert "2/2^2 = 0.5, so it cannot reach 0.05" in md
    assert "0.25" not in md.replace("0.025", "")  # the 3-seed floor is nowhere in a 2-seed report


# ----------------------------------------------------------------------------- page order and folding


class Outline(HTMLParser):
    """Records, in document order, headings (with ids), figures, tables, and whether each sits inside a
    <details>; and the text found outside any <details>."""

    def __init__(self):
        super().__init__()
        self.events, self.depth, self.outside = [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details":
            self.depth += 1
        if tag in ("h2", "figure", "table", "details"):
            self.events.append((tag, a.get("id"), self.depth))

    def handle_endtag(self, tag):
        if tag == "details":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth == 0:
            self.outside.append(data)


def test_html_opens_with_the_answer_and_forest_and_folds_the_details(tmp_path):
    make_fake_study(tmp_path, variants=("softmax", "softmax1", "sink", "clipped"), seeds=2)
    results = study.collect(tmp_path)
    out = report.write_report(tmp_path)
    page = Outline()
    page.feed(out["html"].read_text())
    ev = page.events
    first_table = next(i for i, e in enumerate(ev) if e[0] == "table")
    answer = ev.index(("h2", "answer", 0))
    forest = ev.index(("figure", "fig-forest", 0))
    assert answer < forest < first_table  # the answer and the forest plot come before any table
    assert ev[0] == ("h2", "answer", 0)
    # everything but the effects table, the outliers through training (and failed runs) is folded
    unfolded = [e for e in ev if e[2] == 0 and e[0] in ("table", "figure")]
    assert unfolded == [("figure", "fig-forest", 0), ("table", None, 0), ("figure", "fig-trajectories", 0)]
    assert sum(e[0] == "details" for e in ev) == 6  # + which outlier metric predicts the damage
    # the full verdict sentences are only inside <details>
    outside = " ".join(page.outside)
    for c in results["comparisons"]:
        assert c["verdict"] not in outside
    assert c["verdict"] in out["html"].read_text().replace("&#x27;", "'")


def test_markdown_has_the_same_order_and_no_raw_entities(tmp_path):
    make_fake_study(tmp_path, seeds=2)
    study.collect(tmp_path)
    out = report.write_report(tmp_path)
    md, html = out["md"].read_text(), out["html"].read_text()
    md_order = [md.index(s) for s in ("## Answer", "plots/forest.png", "## Per fix", "## Effects", "<details>")]
    assert md_order == sorted(md_order)
    # the same sections in the same order in both renderings (both come from document.py's blocks)
    heads = ["Answer", "Per fix", "Effects against softmax", "<summary>Setup", "<summary>Summary: mean",
             "<summary>Every comparison", "<summary>Figures (", "<summary>Definitions"]
    assert [md.index(h) for h in heads] == sorted(md.index(h) for h in heads)
    assert [html.index(h) for h in heads] == sorted(html.index(h) for h in heads)
    assert "&gt;" not in md and "--jobs > 1" in md  # readable as plain text; data '<tag' is still escaped
    assert md.count("<details>") == md.count("</details>") == 6  # + which outlier metric predicts the damage


# ----------------------------------------------------------------------------- honest figures


@pytest.fixture
def captured(monkeypatch):
    """The figures plots.py would save, kept open for inspection instead of written."""
    figs = []
    monkeypatch.setattr(P, "_save", lambda fig, path: figs.append(fig))
    yield figs
    import matplotlib.pyplot as plt

    for f in figs:
        plt.close(f)


def test_quant_plot_starts_at_zero_and_shows_the_penalty_in_percent(captured, tmp_path):
    runs = [{"variant": "softmax", "seed": s, "status": "ok", "ppl": fp, "ppl_w8a8": fp * 1.005}
            for s, fp in enumerate((17.4, 17.6))]
    assert P.plot_quant_ppl(runs, ["softmax"], ["w8a8"], tmp_path / "q.png")
    ax, ax2 = captured[0].axes[:2]
    assert ax.get_ylim()[0] == 0  # a 0.5% gap must not look two-fold
    (bar,) = ax2.patches
    assert bar.get_height() == pytest.approx(0.5)  # (1.005 - 1) * 100, by hand


def test_unassigned_mass_heatmaps_share_a_scale_from_the_data(captured, tmp_path):
    def data(v, mass):
        att = [{"layer": i, "head": h, "unassigned_mass": mass + 0.01 * (i + h)} for i in range(2) for h in range(2)]
        return {"variant": v, "eval": {"attention": att}}

    d = [data("softmax1", 0.02), data("clipped", 0.6)]
    assert P.plot_unassigned_mass(d, ["softmax1", "clipped"], tmp_path / "m.png")
    ims = [ax.images[0] for ax in captured[0].axes if ax.images]
    assert len(ims) == 2 and ims[0].norm is ims[1].norm  # one scale for both panels, with a colourbar
    assert (ims[0].norm.vmin, ims[0].norm.vmax) == pytest.approx((0.02, 0.62))  # from the data, not 0..1
    # within one variant's panel the cells now differ in colour (a fixed 0..1 scale painted them alike)
    colours = ims[0].to_rgba(ims[0].get_array())
    assert len({tuple(np.round(c, 3)) for row in colours for c in row}) > 1
    norm, _ = P.mass_norm(0.03, 0.04)  # a narrow positive range: linear, min..max
    assert (norm.vmin, norm.vmax) == (0.03, 0.04) and type(norm).__name__ == "Normalize"
    norm, cmap = P.mass_norm(-0.1, 0.3)  # over-assigning heads: diverging around 0
    assert (norm.vmin, norm.vmax, cmap) == (-0.3, 0.3, "RdBu_r")


def test_attention_maps_say_how_many_positions_they_show(captured, tmp_path):
    probs = np.tril(np.ones((6, 6)))
    probs /= probs.sum(-1, keepdims=True)
    d = [{"variant": "softmax", "seed": 0, "sample": np.broadcast_to(probs, (2, 2, 6, 6))}]
    assert P.plot_attention_maps(d, ["softmax"], tmp_path / "a.png", context=128)
    title = captured[0].get_suptitle()
    assert "the first 6 positions of the model's 128" in title
    assert all("on nothing: 0.00" in ax.get_title() for ax in captured[0].axes if ax.images)


def test_forest_panels_and_marks(captured, tmp_path):
    make_fake_study(tmp_path, variants=("softmax", "softmax1", "clipped"), seeds=3)
    results = study.collect(tmp_path)
    panels = report.forest_panels(results)
    headline = [m for m in results["metric_order"] if (results["metrics"][m]["headline"] or m.startswith("ppl_ratio_"))
                and any(c["metric"] == m for c in results["comparisons"])]
    assert len(panels) == len(headline)  # one panel per headline metric and per quantization penalty
    assert all("(exploratory)" in p["title"] for p in panels)
    assert all([r["label"] for r in p["rows"]] == ["softmax1", "clipped"] for p in panels)  # one row per fix
    pen = panels[headline.index("ppl_ratio_w8a8")]
    c = next(c for c in results["comparisons"] if c["metric"] == "ppl_ratio_w8a8" and c["a"] == "softmax1")
    assert pen["rows"][0]["x"] == pytest.approx(c["diff_mean"] * 100)  # percentage points
    # a planted Holm-significant row is drawn filled, a non-significant one hollow
    rows = [{"label": "sig", "x": -1.0, "lo": -1.5, "hi": -0.5, "kind": "down", "judged": "better"},
            {"label": "ns", "x": 0.2, "lo": -0.5, "hi": 0.9, "kind": "none", "judged": "worse"}]
    assert P.plot_forest([{"title": "t", "xlabel": "x", "rows": rows}], tmp_path / "f.png", "softmax")
    marks = [ln for ln in captured[0].axes[0].lines if ln.get_marker() == "o"]
    assert marks[0].get_markerfacecolor() != "white" and marks[1].get_markerfacecolor() == "white"


# ----------------------------------------------------------------------------- the first screen, in a browser

_PROBE = ("<script>addEventListener('load',()=>{const r=id=>document.getElementById(id).getBoundingClientRect();"
          "const f=r('fig-forest'),a=r('answer');document.body.setAttribute('data-geom',JSON.stringify("
          "{forest_top:f.top,forest_bottom:f.bottom,answer_top:a.top,vh:innerHeight,vw:innerWidth}));});</script>")


@pytest.mark.slow
@pytest.mark.parametrize("variants", [("softmax", "softmax1", "sink", "clipped"),
                                      ("softmax", "softmax1", "softmax_n", "sink", "clipped", "gated")])
def test_first_screen_shows_the_answer_and_the_forest_plot(tmp_path, variants):
    """Layout in headless chromium (Debian: `apt-get install chromium`; skipped without it) at 1280 x 800.

    A copy of report.html with a probe script (the report itself has none) records where the answer
    and the forest plot land; both must end within the first viewport. To look at it yourself:
        chromium --headless --no-sandbox --hide-scrollbars --window-size=1280,800 \\
            --screenshot=first_screen.png file://$PWD/runs/study/report.html
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium: the layout check needs a headless browser")
    make_fake_study(tmp_path, variants=variants, seeds=2)
    study.collect(tmp_path)
    html = report.write_report(tmp_path)["html"].read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", _PROBE + "</body>"))
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,800"]
    dom = subprocess.run([*args, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    start = dom.index('data-geom="') + len('data-geom="')
    geom = json.loads(dom[start:dom.index('"', start)].replace("&quot;", '"'))
    assert geom["vw"] == 1280 and geom["vh"] <= 800
    assert geom["forest_bottom"] - geom["forest_top"] > 200  # the image was laid out, not a 0-px box
    assert geom["answer_top"] < geom["forest_top"] and geom["forest_bottom"] <= geom["vh"]
    shot = tmp_path / "first_screen.png"
    subprocess.run([*args, f"--screenshot={shot}", (tmp_path / "report.html").as_uri()], capture_output=True,
                   timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not math.isnan(geom["vh"])


def test_diff_mass_is_subtracted_not_abstention():
    """recipes-cpu's report said "diff let heads abstain: 32% of attention on nothing". diff's rows sum to
    1 - lambda, but its per-head RMSNorm then restores the output's scale, so that mass is subtracted, not
    left on nothing: the fix line says so and the short answer does not count diff among the abstainers."""
    r = _results(variants=("softmax", "softmax1", "diff"))
    r["summary"]["unassigned_mass_mean"]["diff"] = {"mean": 0.32, "ci95_low": 0.28, "ci95_high": 0.36}
    line = A.fix_line(r, "diff")
    assert line.startswith("diff (exploratory): rows sum to 1 - lambda: 32% [28, 36] of attention subtracted, "
                           "then renormalised per head (not abstention)")
    assert "heads abstain" not in line
    short = A.short_answer(r, True)
    assert short.startswith("Short answer (exploratory): softmax1 let heads abstain;")
    r["summary"]["unassigned_mass_mean"].pop("softmax1")
    assert "no fix leaves attention on nothing" in A.short_answer(r, True)
