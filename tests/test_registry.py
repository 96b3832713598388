"""The metric registry: one definition per metric, the same number in eval JSON, study row, CSV and report."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import types

import numpy as np
import pytest
import torch
from scipy import stats as sps

from quietgpt import GPT, GPTConfig, report, study
from quietgpt.measurement.evaluate import measure
from quietgpt.measurement.registry import catalogue, study_metrics
from quietgpt.stats import fmt
from quietgpt.utils.atomic import atomic_write_json


def tiny_gated(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, attention="gated")).eval()


def data(vocab: int = 32):
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(train=rng.integers(0, vocab, 3000).astype(np.uint16),
                                 val=rng.integers(0, vocab, 600).astype(np.uint16), vocab_size=vocab)


def block_weight_kurtosis_max(model: GPT) -> float:
    """Independent reference: scipy's Pearson kurtosis of the four block matmul weights, max over layers."""
    ks = [sps.kurtosis(p.detach().double().numpy().ravel(), fisher=False, bias=True)
          for name, p in model.named_parameters()
          if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))]
    assert len(ks) == 4 * model.config.n_layer
    return max(ks)


def test_gate_outlier_gives_one_weight_kurtosis_everywhere(tmp_path):
    """A planted outlier in a gate weight: eval JSON, the study's row, results.csv and the report all show
    the block-matmul kurtosis (the gate is not a block matmul weight), not two different numbers."""
    model = tiny_gated()
    with torch.no_grad():
        model.transformer.h[0].attn.gate.weight[0, 0] = 1e3  # the planted outlier
    gate = model.transformer.h[0].attn.gate.weight.detach().double().numpy().ravel()
    want = block_weight_kurtosis_max(model)
    assert sps.kurtosis(gate, fisher=False) > 3 * want  # it would dominate, were gates counted
    ev = measure(model, data(), quant=["w8a8"], n_sequences=4, calib_batches=2).to_dict()
    assert ev["summary"]["weight_kurtosis_max"] == pytest.approx(want, rel=1e-9)

    spec = dataclasses.replace(study.resolve_spec("default", variants=["softmax", "gated"], seeds=1,
                                                  quant=["w8a8"]))
    atomic_write_json(tmp_path / "study.json", spec.to_dict())
    for v in spec.variants:
        d = tmp_path / "runs" / study.run_name(v, 0)
        row = study.run_row(v, 0, {"val_loss": 3.0}, ev, spec.metrics, f"runs/{d.name}", 1.0)
        atomic_write_json(d / "eval.json", ev)
        atomic_write_json(d / "result.json", row)
    assert row["weight_kurtosis_max"] == ev["summary"]["weight_kurtosis_max"]
    results = study.collect(tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert {float(r["weight_kurtosis_max"]) for r in csv_rows} == {row["weight_kurtosis_max"]}
    assert results["summary"]["weight_kurtosis_max"]["gated"]["mean"] == row["weight_kurtosis_max"]
    md = report.write_report(tmp_path)["md"].read_text()
    summary = md.split("<summary>Summary")[1]  # the means table (the effects table above it holds differences)
    line = next(ln for ln in summary.splitlines() if ln.startswith("| weight kurtosis max |"))
    assert fmt(row["weight_kurtosis_max"]) in line


def _by_hand(m, ev: dict):
    """A metric recomputed from the eval JSON by this test's own selection and reduction (not the registry's
    Selection.keep and reducers): the value measure() must have put in its summary."""
    import re

    import numpy as np

    from quietgpt.measurement.registry import MAX, MEAN, SUM

    keep = {"weights": lambda e: re.fullmatch(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                                              r"\.weight", e["name"]) is not None,
            "activations": lambda e: e["site"] in ("embeddings", "attn_out", "mlp_hidden", "mlp_out", "block_out")}
    if m.select.section == "activations" and m.select.text.startswith("the residual stream after each block"):
        keep["activations"] = lambda e: e["site"] == "block_out"
    if m.key.startswith(("wpe_", "wte_")):  # one embedding table
        keep["weights"] = lambda e: e["name"] == f"transformer.{m.key[:3]}.weight"
    values = [e[m.field] for e in ev[m.select.section] if keep.get(m.select.section, lambda e: True)(e)
              and e.get(m.field) is not None]
    if not values:
        return None
    return {id(MAX): max, id(MEAN): lambda v: float(np.mean(v)), id(SUM): sum}[id(m.reduce)](values)


def test_every_eval_metric_is_in_measure_summary_and_agrees():
    """measure()'s summary is exactly the registry's eval metrics (plus two location entries), each equal to
    its definition recomputed here from the eval JSON's entries."""
    from quietgpt.measurement.registry import catalogue

    model = tiny_gated(1)
    ev = measure(model, data(), quant=["w8a8", "w4a8"], n_sequences=4, calib_batches=2).to_dict()
    metrics = {k: m for k, m in catalogue(["w8a8", "w4a8"]).items() if m.source == "eval"}
    got = {k: v for k, v in ev["summary"].items() if not k.endswith("_at")}
    assert got.keys() == metrics.keys()
    for k, m in metrics.items():
        if m.read is None:
            want = _by_hand(m, ev)
            assert (got[k] is None) if want is None else got[k] == pytest.approx(want, rel=1e-12), k
    # the rest by their definitions
    acts = [a for a in ev["activations"] if a["site"] != "attn_probs"]
    assert got["act_inf_norm_max"] == max(a["inf_norm_max"] for a in acts)
    block = [a for a in ev["activations"] if a["site"] == "block_out"]
    assert got["block_out_inf_norm_seq_mean_max"] == max(a["inf_norm_mean"] for a in block)
    for q in ("w8a8", "w4a8"):
        assert got[f"kl_{q}"] == ev["kl"][q] and got[f"top1_{q}"] == ev["top1_agreement"][q]
        assert got[f"ppl_{q}"] == ev["perplexity"][q]
        assert got[f"ppl_ratio_{q}"] == pytest.approx(ev["perplexity"][q] / ev["perplexity"]["fp"])
    assert got["ppl"] == ev["perplexity"]["fp"]
    assert "block_out_inf_norm_max" not in got  # renamed: it is a max over layers of a mean over sequences


def test_catalogue_is_well_formed():
    cat = catalogue(["w8a8", "w4a8"], eval_tokens=1000)
    for key, m in cat.items():
        assert m.key == key and m.label and m.unit and m.definition and m.paper
        assert m.source in ("eval", "train", "run")
        assert (m.read is None) == (m.select is not None and m.field is not None and m.reduce is not None)
    assert "the first 1,000 tokens" in cat["ppl"].definition
    assert "whole validation split" in catalogue(["w8a8"])["ppl"].definition
    # the study's row keys, in the order the report and CSV show them
    assert list(study_metrics(["w8a8", "w4a8"])) == [
        "val_loss", "ppl", "weight_kurtosis_mean", "weight_kurtosis_max", "weight_max_abs", "wpe_kurtosis",
        "wpe_max_abs", "wte_kurtosis", "wte_max_abs", "act_inf_norm_max", "act_kurtosis_mean",
        "unassigned_mass_mean", "sink_rate", "first_token_argmax_share", "attention_zero_share",
        "massive_ratio_max", "massive_count",
        "bondarenko_max_inf_norm", "bondarenko_avg_kurtosis", "act_max_first_token", "act_max_other_tokens",
        "act_kurtosis_first_token", "act_kurtosis_other_tokens", "gate_mean", "ppl_w8a8", "ppl_w4a8", "ppl_ratio_w8a8",
        "ppl_ratio_w4a8", "kl_w8a8", "kl_w4a8", "top1_w8a8", "top1_w4a8", "tokens_per_s", "wall_s"]
    assert not any(k.startswith(("ppl_", "kl_", "top1_")) for k in study_metrics([]))
    assert [k for k, m in cat.items() if m.headline] == [
        "val_loss", "ppl", "weight_kurtosis_max", "act_inf_norm_max", "act_kurtosis_mean", "unassigned_mass_mean",
        "sink_rate", "bondarenko_max_inf_norm", "ppl_w8a8", "ppl_ratio_w8a8"]


def test_missing_values_are_none_never_nan():
    cat = catalogue(["w8a8"])
    assert all(m.value({}, {}) is None for m in cat.values())
    ev = {"weights": [{"name": "transformer.h.0.mlp.c_fc.weight", "layer": 0, "kurtosis": None}],
          "perplexity": {"fp": float("nan"), "w8a8": 3.0}}
    assert cat["weight_kurtosis_max"].value(ev) is None and cat["ppl_ratio_w8a8"].value(ev) is None


def test_eval_tokens_measures_the_first_tokens_only():
    """Perplexity on the first n validation tokens equals the perplexity of a dataset cut to those tokens."""
    model, ds = tiny_gated(2), data()
    cut = types.SimpleNamespace(train=ds.train, val=ds.val[:200], vocab_size=ds.vocab_size)
    a = measure(model, ds, quant=[], n_sequences=2, eval_tokens=200).to_dict()
    b = measure(model, cut, quant=[], n_sequences=2).to_dict()
    assert a["perplexity"]["tokens"] == 199 and a["perplexity"]["fp"] == b["perplexity"]["fp"]
    assert a["eval_tokens"] == 200 and b["eval_tokens"] is None
    assert math.isfinite(a["perplexity"]["fp"])
    full = measure(model, ds, quant=[], n_sequences=2).to_dict()
    assert full["perplexity"]["tokens"] == 599
    assert json.dumps(a)  # plain JSON
