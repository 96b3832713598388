"""The report from fixed, synthetic study results: tables, plots, self-contained escaped HTML, rebuilds."""

from __future__ import annotations

import dataclasses
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from quietgpt import report, study
from quietgpt.cli import main
from quietgpt.errors import QuietError
from quietgpt.measurement.registry import study_metrics
from quietgpt.utils.atomic import atomic_write_json

EVIL = "<script>alert(1)</script>"
N_LAYER, N_HEAD, T = 2, 2, 6


def fake_eval(rng: np.random.Generator, variant: str, quant) -> dict:
    """An eval.json shaped like metrics.Measurement.to_dict(), with made-up numbers."""
    weights = [{"name": f"transformer.h.{i}.{m}.weight", "layer": i, "kind": "linear", "numel": 100,
                "kurtosis": float(3 + rng.random() * 5), "excess_kurtosis": 0.0, "max_abs": 1.0}
               for i in range(N_LAYER) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    # these must not enter weight_kurtosis_*: embeddings, LayerNorm, gates (huge kurtosis to be noticed)
    weights += [{"name": "transformer.wte.weight", "layer": -1, "kind": "embedding", "kurtosis": 1e6},
                {"name": "transformer.h.0.ln_1.weight", "layer": 0, "kind": "layernorm", "kurtosis": 1e6},
                {"name": "transformer.h.0.attn.gate.weight", "layer": 0, "kind": "linear", "kurtosis": 1e6}]
    acts = [{"site": s, "layer": i, "inf_norm_mean": 1.0, "inf_norm_max": float(1 + rng.random() * 10),
             "kurtosis": float(3 + rng.random()), "top_dims": [0]}
            for i in range(N_LAYER) for s in ("attn_out", "mlp_hidden", "mlp_out", "block_out")]
    acts += [{"site": "embeddings", "layer": -1, "inf_norm_mean": 1.0, "inf_norm_max": 2.0, "kurtosis": 3.0},
             {"site": "attn_probs", "layer": 0, "inf_norm_mean": 1.0, "inf_norm_max": 1e6, "kurtosis": 1e6}]
    null = variant != "softmax"
    att = [{"layer": i, "head": h, "unassigned_mass": float(rng.random() * 0.5) if null else 0.0,
            "first_token_mass": 0.5, "entropy": 1.0} for i in range(N_LAYER) for h in range(N_HEAD)]
    ppl = {"fp": float(5 + rng.random()), "tokens": 1000}
    for k, q in enumerate(quant):
        ppl[q] = ppl["fp"] * (1.01 + 0.2 * k)
    return {"weights": weights, "activations": acts, "attention": att, "perplexity": ppl}


TRAJECTORY = (0, 5, 10, 15, 19)  # the fake runs' trajectory points; the quantized ratios at 0, 10 and 19


def fake_outliers(variant: str, seed: int, it: int) -> dict:
    """A trajectory point: softmax's W4A8 penalty grows past 1.1 at iteration 10 (seed mean 1.2), softmax1's
    never does (below 1.05); first-token mass and weight kurtosis grow."""
    k = 1 if variant == "softmax" else 3  # paired differences that vary by seed
    row = {"first_token_mass_mean": 0.1 + it / 40 + k * seed / 100, "weight_kurtosis_max": 3 + it / 10 + seed / 100,
           "unassigned_mass_mean": 0.0 if variant == "softmax" else 0.02 + seed / 100}
    if it in (0, 10, 19):
        row["ppl_ratio_w8a8"] = 1.0
        row["ppl_ratio_w4a8"] = 1.0 + it / (50 if variant == "softmax" else 500) + k * seed / 1000
    return row


def make_fake_study(root: Path, variants=("softmax", "softmax1"), seeds=3, data="synthetic",
                    fail: tuple | None = None) -> dict:
    """A finished study folder with made-up run results (no training): what `quietgpt study` leaves."""
    # replace() rather than resolve_spec(variants=...): the escaping test needs a variant name no config takes
    spec = dataclasses.replace(study.resolve_spec("default", seeds=seeds, data=data), variants=tuple(variants))
    atomic_write_json(root / "study.json", spec.to_dict())
    rng = np.random.default_rng(0)
    for v in variants:
        for s in spec.seeds:
            name = study.run_name(v, s)
            d = root / "runs" / name
            if fail == (v, s):
                row = study.failed_row(v, s, f"runs/{name}", f"RuntimeError: boom {EVIL}", 1.0)
            else:
                ev = fake_eval(rng, v, spec.quant)
                atomic_write_json(d / "eval.json", ev)
                log = [{"iter": i, "loss": 4.0 - i / 10 + rng.random() * 0.1, "lr": 1e-3} for i in range(0, 20, 2)]
                log += [{"iter": i, "train_loss": 4 - i / 10, "val_loss": 4.1 - i / 10 + s * 0.01}
                        for i in (0, 10, 19)]
                log += [{"iter": i, "outliers": fake_outliers(v, s, i), "outlier_s": 0.1} for i in TRAJECTORY]
                (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n{\"iter\": 2")
                probs = rng.random((N_LAYER, N_HEAD, T, T)) * np.tril(np.ones((T, T)))
                probs /= probs.sum(-1, keepdims=True) * (1.25 if v != "softmax" else 1.0)
                np.savez(d / "attn_sample.npz", probs=probs.astype(np.float32))
                summary = {"val_loss": 2.2 + s * 0.01, "tokens_per_s": 1000.0, "wall_s": 3.0, "iters": 20}
                row = study.run_row(v, s, summary, ev, spec.metrics, f"runs/{name}", 4.0)
            atomic_write_json(d / "result.json", row)
    return spec


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.scripts, self.links = [], 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        self.scripts += tag == "script"
        self.links += tag == "link" or (tag == "img" and not a.get("src", "").startswith("data:"))


def test_run_row_uses_the_documented_weights_and_sites():
    ev = fake_eval(np.random.default_rng(1), "softmax1", ["w8a8"])
    row = study.run_row("softmax1", 0, {"val_loss": 2.0}, ev, study_metrics(["w8a8"]), "runs/x", 1.0)
    lin = [w["kurtosis"] for w in ev["weights"] if w["kurtosis"] < 1e6]
    assert row["weight_kurtosis_max"] == pytest.approx(max(lin))
    assert row["weight_kurtosis_mean"] == pytest.approx(np.mean(lin))
    acts = [a for a in ev["activations"] if a["site"] != "attn_probs"]
    assert row["act_inf_norm_max"] == pytest.approx(max(a["inf_norm_max"] for a in acts))
    assert row["act_kurtosis_mean"] == pytest.approx(np.mean([a["kurtosis"] for a in acts]))
    assert row["unassigned_mass_mean"] == pytest.approx(np.mean([a["unassigned_mass"] for a in ev["attention"]]))
    assert row["ppl"] == ev["perplexity"]["fp"] and row["ppl_w8a8"] == ev["perplexity"]["w8a8"]
    assert row["ppl_ratio_w8a8"] == pytest.approx(1.01)


def test_report_from_fixed_results(tmp_path):
    make_fake_study(tmp_path, fail=("softmax1", 2))
    results = study.collect(tmp_path)
    out = report.write_report(tmp_path)
    # the contract keys
    assert {"runs", "summary", "comparisons", "config"} <= set(results)
    contract = ["variant", "seed", "status", "error", "val_loss", "ppl", "ppl_w8a8", "weight_kurtosis_mean",
                "weight_kurtosis_max", "act_inf_norm_max", "act_kurtosis_mean", "unassigned_mass_mean",
                "tokens_per_s", "wall_s", "dir"]
    ok = [r for r in results["runs"] if r["status"] == "ok"]
    assert len(results["runs"]) == 6 and len(ok) == 5
    for r in results["runs"]:
        assert set(contract) <= set(r) or r["status"] == "failed"
    failed = [r for r in results["runs"] if r["status"] == "failed"]
    assert failed[0]["error"].startswith("RuntimeError: boom")
    s = results["summary"]["val_loss"]["softmax"]
    assert set(s) >= {"mean", "ci95_low", "ci95_high", "n"} and s["n"] == 3
    assert s["mean"] == pytest.approx(2.21)
    assert results["summary"]["val_loss"]["softmax1"]["n"] == 2  # the failed run does not count
    c = next(c for c in results["comparisons"] if c["metric"] == "val_loss")
    assert (c["a"], c["b"], c["n"]) == ("softmax1", "softmax", 2) and c["diff_mean"] == pytest.approx(0.0)
    assert {"metric", "a", "b", "diff_mean", "ci95_low", "ci95_high", "p_value", "test", "verdict"} <= set(c)
    # CSV: one row per run
    lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 7 and lines[0].startswith("variant,seed,status,error,")
    # plots: every promised one exists and is a PNG
    names = [p.name for p in out["plots"]]
    assert names[0] == "forest.png"  # the first figure
    assert sorted(names) == sorted(["forest.png", "loss_curves.png", "weight_kurtosis.png", "activations.png",
                                    "unassigned_mass.png", "quant_ppl.png", "attention_maps.png",
                                    "trajectories.png"])
    for p in out["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out["md"].read_text()
    order = ["## Answer", "plots/forest.png", "## Per fix", "## Effects against softmax", "## Failed runs",
             "<summary>Setup", "<summary>Summary", "<summary>Every comparison", "<summary>Figures",
             "<summary>Definitions"]
    assert [md.index(h) for h in order] == sorted(md.index(h) for h in order)
    assert "softmax1-s2" in md and "boom" in md


def test_html_is_self_contained_and_has_every_plot(tmp_path):
    make_fake_study(tmp_path)
    study.collect(tmp_path)
    out = report.write_report(tmp_path)
    parser = Images()
    parser.feed(out["html"].read_text())
    parser.close()
    assert parser.scripts == 0 and parser.links == 0  # nothing to fetch: works offline
    assert len(parser.imgs) == len(out["plots"]) == 8  # the fake study carries trajectories
    import base64

    for img, path in zip(parser.imgs, out["plots"], strict=True):
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]) == path.read_bytes()


def test_every_string_is_escaped(tmp_path):
    make_fake_study(tmp_path, variants=("softmax", EVIL), data=f"{EVIL}.txt", fail=(EVIL, 1))
    study.collect(tmp_path)
    out = report.write_report(tmp_path)
    text = out["html"].read_text()
    assert "<script" not in text  # the variant name, the data source and the error message are all escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    parser = Images()
    parser.feed(text)
    assert parser.scripts == 0
    assert "<script" not in out["md"].read_text()
    # the heatmap's file name is sanitised
    assert all("<" not in p.name for p in out["plots"])


def test_single_seed_says_ci_undefined(tmp_path):
    make_fake_study(tmp_path, seeds=1)
    results = study.collect(tmp_path)
    s = results["summary"]["ppl"]["softmax1"]
    assert s["n"] == 1 and s["ci95_low"] is None
    have = [c for c in results["comparisons"] if "has no such value" not in c["verdict"]  # metrics the fake lacks
            and c["family"] == "exploratory"]
    assert have and all(c["verdict"].startswith("exploratory: not enough seeds") for c in have)
    md = report.write_report(tmp_path)["md"].read_text()
    assert "no CI" in md


def test_report_cli_rebuilds_from_run_folders(tmp_path, capsys):
    make_fake_study(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    # edit one run's result on disk: the rebuild picks it up, nothing is trained
    p = tmp_path / "runs" / "softmax-s0" / "result.json"
    r = json.loads(p.read_text())
    r["val_loss"] = 9.0
    p.write_text(json.dumps(r))
    (tmp_path / "report.html").unlink()
    assert main(["report", str(tmp_path)]) == 0
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["summary"]["val_loss"]["softmax"]["mean"] == pytest.approx(
        (9.0 + 2.21 + 2.22) / 3)
    assert first["summary"]["val_loss"]["softmax"]["mean"] == pytest.approx(2.21)
    assert (tmp_path / "report.html").is_file()
    assert "runs ok" in capsys.readouterr().out
    assert not math.isnan(second["summary"]["ppl"]["softmax"]["mean"])


def test_report_on_missing_folder_is_one_line_error(tmp_path, capsys):
    with pytest.raises(QuietError):
        report.load_results(tmp_path / "nope")
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "quietgpt study" in err and len(err.strip().splitlines()) == 1


def test_report_shows_outliers_through_training(tmp_path):
    from quietgpt.measurement.registry import mean_level

    make_fake_study(tmp_path)
    results = study.collect(tmp_path)
    # per-run areas: the registry's mean level of each planted trajectory, summarised and compared paired
    row = next(r for r in results["runs"] if (r["variant"], r["seed"]) == ("softmax", 1))
    # hand: W4A8 points (0, 1.001), (10, 1.201), (19, 1.381): (10 * 2.202 / 2 + 9 * 2.582 / 2) / 19
    assert row["auc_ppl_ratio_w4a8"] == pytest.approx((10 * 2.202 / 2 + 9 * 2.582 / 2) / 19)
    assert row["auc_weight_kurtosis_max"] == pytest.approx(
        mean_level([(i, 3 + i / 10 + 0.01) for i in TRAJECTORY]))
    assert results["summary"]["auc_ppl_ratio_w4a8"]["softmax"]["n"] == 3
    c = next(c for c in results["comparisons"] if c["metric"] == "auc_ppl_ratio_w4a8")
    assert c["a"] == "softmax1" and c["diff_mean"] < 0
    assert "auc_first_token_mass_mean" in (tmp_path / "results.csv").read_text().splitlines()[0]
    # emergence: softmax's seed-mean W4A8 penalty crosses 1.1 at 10, softmax1's never; no sink rate was measured
    em = {(e["metric"], e["variant"]): e for e in results["trajectories"]["emergence"]}
    assert em["ppl_ratio_w4a8", "softmax"]["first_iter"] == 10
    assert em["ppl_ratio_w4a8", "softmax1"]["first_iter"] is None
    assert em["sink_rate", None]["first_iter"] is None
    assert results["trajectories"]["order"][0] == "weight_kurtosis_max"  # registry order
    out = report.write_report(tmp_path)
    assert (tmp_path / "plots" / "trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out["md"].read_text()
    assert md.index("## Effects against") < md.index("## Outliers through training") < md.index("<details>")
    assert "never exceeds 1.1 within 19 iterations" in md and "first exceeds 1.1 at iteration 10" in md
    assert "(plots/trajectories.png)" in md
