"""metrics.py against independent references: scipy, hand loops in float64, direct computations."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from quietgpt import GPT, GPTConfig, QuietError
from quietgpt.measurement.collectors import StatsCollector, weight_stats
from quietgpt.measurement.evaluate import measure
from quietgpt.measurement.moments import Moments, kurtosis
from quietgpt.measurement.perplexity import eval_windows
from quietgpt.nn.variants import VARIANTS


def tiny(attention: str = "softmax", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=48, n_layer=2, n_head=2, n_embd=16, attention=attention)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def dataset(vocab: int = 48, n_val: int = 1000, n_train: int = 4000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return types.SimpleNamespace(train=rng.integers(0, vocab, n_train).astype(np.uint16),
                                 val=rng.integers(0, vocab, n_val).astype(np.uint16), vocab_size=vocab)


# ----------------------------------------------------------------------------- kurtosis and moments


@pytest.mark.parametrize("dist", ["normal", "student_t", "outlier", "offset"])
@pytest.mark.parametrize("fisher", [False, True])
def test_kurtosis_matches_scipy(dist, fisher):
    rng = np.random.default_rng(1)
    x = {"normal": rng.normal(size=5000), "student_t": rng.standard_t(4, size=5000),
         "outlier": np.r_[rng.normal(size=4999), 80.0], "offset": 1e4 + rng.normal(size=5000)}[dist]
    want = scipy.stats.kurtosis(x, fisher=fisher, bias=True)
    assert kurtosis(x, fisher=fisher) == pytest.approx(want, rel=1e-9)
    assert kurtosis(torch.tensor(x, dtype=torch.float32).reshape(50, 100), fisher=fisher) == pytest.approx(
        scipy.stats.kurtosis(x.astype(np.float32).astype(np.float64), fisher=fisher, bias=True), rel=1e-6)


def test_kurtosis_undefined_is_none_not_nan():
    assert kurtosis(np.ones(10)) is None
    assert kurtosis(np.array([3.0])) is None
    assert Moments().kurtosis() is None


def test_streaming_moments_equal_one_shot():
    rng = np.random.default_rng(2)
    x = np.r_[rng.standard_t(3, size=7777) * 3 + 50, rng.normal(size=10)]
    whole = Moments().update(x)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=25, replace=False))
    chunked = Moments()
    for part in np.split(x, cuts):  # uneven chunks, including length-1 ones at random
        chunked.update(torch.from_numpy(part))
    assert chunked.n == whole.n == len(x)
    assert chunked.mean == pytest.approx(x.mean(), rel=1e-12)
    assert chunked.var == pytest.approx(x.var(), rel=1e-10)
    assert chunked.kurtosis() == pytest.approx(whole.kurtosis(), rel=1e-10)
    assert chunked.kurtosis() == pytest.approx(scipy.stats.kurtosis(x, fisher=False, bias=True), rel=1e-10)
    # merging is order independent: two halves merged either way
    a, b = Moments().update(x[:3000]), Moments().update(x[3000:])
    b2 = Moments().update(x[3000:]).merge(Moments().update(x[:3000]))
    assert a.merge(b).kurtosis() == pytest.approx(b2.kurtosis(), rel=1e-10)


# ----------------------------------------------------------------------------- weights


def test_weight_stats_per_tensor_and_layer_against_scipy():
    model = tiny("sink")
    rows, by_layer = weight_stats(model)
    names = [r["name"] for r in rows]
    assert names.count("transformer.wte.weight") == 1 and "lm_head.weight" not in names  # tied: listed once
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["transformer.wte.weight"] == kinds["transformer.wpe.weight"] == "embedding"
    assert kinds["transformer.h.0.ln_1.weight"] == "layernorm"
    assert kinds["transformer.h.1.attn.c_attn.weight"] == "linear"
    assert kinds["transformer.h.1.mlp.c_fc.bias"] == "bias"
    assert kinds["transformer.h.0.attn.core.sink_logit"] == "sink"
    params = dict(model.named_parameters())
    for r in rows:
        w = params[r["name"]].detach().double().numpy().ravel()
        assert r["numel"] == w.size
        assert r["max_abs"] == pytest.approx(np.abs(w).max())
        if np.var(w) > 0:
            assert r["kurtosis"] == pytest.approx(scipy.stats.kurtosis(w, fisher=False), rel=1e-9)
            assert r["excess_kurtosis"] == pytest.approx(r["kurtosis"] - 3.0, rel=1e-9)
        else:  # LayerNorm weights (all ones) and biases (all zeros) at init
            assert r["kurtosis"] is None
        assert r["layer"] == (int(r["name"].split(".")[2]) if r["name"].startswith("transformer.h.") else -1)
    assert [b["layer"] for b in by_layer] == [0, 1]
    pooled = np.concatenate([params[r["name"]].detach().double().numpy().ravel()
                             for r in rows if r["layer"] == 1 and r["kind"] == "linear"])
    assert by_layer[1]["kurtosis"] == pytest.approx(scipy.stats.kurtosis(pooled, fisher=False), rel=1e-9)
    assert by_layer[1]["numel"] == pooled.size


@pytest.mark.parametrize("attention, extra", [("softmax", {}), ("kvbias", {}), ("gated", {}), ("outgate", {}),
                                              ("outgate", {"gate_mode": "headwise"}), ("sink", {})])
def test_weights_by_layer_pools_the_same_four_matmuls_in_every_variant(attention, extra):
    """Review defect: kvbias's k'/v' and the gate weights were labelled "linear" and pooled into
    weights_by_layer for those variants only. Per layer the pool is the four block matmuls, 12 C^2 numbers
    (c_attn 3C x C, attn.c_proj C x C, c_fc 4C x C, mlp.c_proj C x 4C), whatever the variant."""
    model = tiny(attention, **extra)
    rows, by_layer = weight_stats(model)
    C = model.config.n_embd
    assert [b["numel"] for b in by_layer] == [12 * C * C] * model.config.n_layer
    kinds = {r["name"]: r["kind"] for r in rows}
    extras = [n for n in kinds if ".core.k_bias" in n or ".core.v_bias" in n or ".attn.gate." in n]
    assert all(kinds[n] != "linear" for n in extras), {n: kinds[n] for n in extras}


@pytest.mark.parametrize("attention, extra", [(v, {}) for v in VARIANTS] + [
    ("softmax", {"norm": "ssnorm"}), ("softmax", {"norm": "rmsnorm"}), ("softmax", {"block": "op"}),
    ("softmax", {"embed_proj": True}), ("diff", {"block": "op", "norm": "ssnorm", "embed_proj": True})])
def test_every_parameter_of_every_variant_and_recipe_has_a_weight_kind(attention, extra):
    """Defect (recipes-cpu's first launch): diff's lambda vectors had no kind, so weight_stats raised and every
    diff run of the study failed at its first outlier snapshot. Every parameter of every variant and model
    option gets a kind, the per-layer pool is still the four block matmuls, and diff's lambdas are "lambda"."""
    model = tiny(attention, **extra)
    rows, by_layer = weight_stats(model)
    C = model.config.n_embd
    assert {r["name"] for r in rows} == {n for n, _ in model.named_parameters()}
    assert [b["numel"] for b in by_layer] == [12 * C * C] * model.config.n_layer
    lambdas = sorted(r["name"].rsplit(".", 1)[1] for r in rows if r["kind"] == "lambda" and r["layer"] == 0)
    assert lambdas == (["lk1", "lk2", "lq1", "lq2"] if attention == "diff" else [])


# ----------------------------------------------------------------------------- activations


def _capture(model: GPT, x: torch.Tensor) -> dict:
    """Every tap's activation for input x, by hand with plain forward hooks (not GPT.observe)."""
    got, handles = {}, []
    for site, layer, tap in model.sites():
        if site != "attn_probs":
            handles.append(tap.register_forward_hook(
                lambda _m, _i, out, key=(site, layer): got.setdefault(key, []).append(out.detach().double())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {k: v[0] for k, v in got.items()}


def test_activation_stats_against_direct_computation():
    model = tiny("softmax1")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 48, (3, 32), generator=g) for _ in range(2)]
    col = StatsCollector(top_k=3)
    for x in batches:
        col.tokens = x
        with torch.no_grad(), model.observe(col):
            model(x)
    rows = {(r["site"], r["layer"]): r for r in col.activation_rows()}
    assert len(rows) == 1 + 5 * 2
    acts = [_capture(model, x) for x in batches]
    for key, row in rows.items():
        if key[0] == "attn_probs":
            continue
        both = torch.cat([a[key] for a in acts])  # (6, T, C)
        per_seq = both.abs().amax(dim=(1, 2))
        assert row["inf_norm_mean"] == pytest.approx(float(per_seq.mean()), rel=1e-6)
        assert row["inf_norm_max"] == pytest.approx(float(per_seq.max()), rel=1e-6)
        assert row["kurtosis"] == pytest.approx(scipy.stats.kurtosis(both.numpy().ravel(), fisher=False), rel=1e-6)
        dim_max = both.abs().amax(dim=(0, 1))
        assert [d["dim"] for d in row["top_dims"]] == dim_max.topk(3).indices.tolist()
        b, t, c = np.unravel_index(int(both.abs().argmax()), tuple(both.shape))
        tokens = torch.cat(batches)
        assert (row["max"]["dim"], row["max"]["position"], row["max"]["token"]) == (c, t, int(tokens[b, t]))


def _probs_by_hand(model: GPT, x: torch.Tensor, layer: int, null: bool) -> torch.Tensor:
    """(B, H, T, T) attention weights of one block in float64, from its ln_1 output, by hand."""
    seen = {}
    blk = model.transformer.h[layer]
    h = blk.ln_1.register_forward_hook(lambda _m, _i, out: seen.setdefault("x", out.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    B, T, C = seen["x"].shape
    H = model.config.n_head
    w, bias = blk.attn.c_attn.weight.detach().double(), blk.attn.c_attn.bias.detach().double()
    qkv = seen["x"].double() @ w.t() + bias
    q, k, _ = qkv.split(C, dim=2)
    q = q.view(B, T, H, C // H).transpose(1, 2)
    k = k.view(B, T, H, C // H).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(C // H)
    e = torch.exp(s).tril()  # masked keys contribute exp(-inf) = 0
    return e / (e.sum(-1, keepdim=True) + (1.0 if null else 0.0))


@pytest.mark.parametrize("variant", ["softmax", "softmax1"])
def test_attention_stats_against_hand_probabilities(variant):
    model = tiny(variant, seed=3)
    with torch.no_grad():  # sharpen the scores so softmax1 leaves visibly different mass per head
        for blk in model.transformer.h:
            blk.attn.c_attn.weight.mul_(8.0)
    x = torch.randint(0, 48, (4, 32), generator=torch.Generator().manual_seed(1))
    col = StatsCollector()
    with torch.no_grad(), model.observe(col, sites=("attn_probs",)):
        model(x)
    assert set(model.attention_paths()) == {"reference"}
    rows = {(r["layer"], r["head"]): r for r in col.attention_rows()}
    assert len(rows) == 2 * 2
    for layer in range(2):
        p = _probs_by_hand(model, x, layer, null=variant == "softmax1")
        unassigned = 1.0 - p.sum(-1)  # (B, H, T)
        u = unassigned.clamp(min=0)
        ent = -(torch.special.xlogy(p, p).sum(-1) + torch.special.xlogy(u, u))
        for head in range(2):
            r = rows[(layer, head)]
            assert r["unassigned_mass"] == pytest.approx(float(unassigned[:, head].mean()), abs=2e-6)
            assert r["first_token_mass"] == pytest.approx(float(p[:, head, :, 0].mean()), abs=2e-6)
            assert r["entropy"] == pytest.approx(float(ent[:, head].mean()), abs=1e-5)
    mass = [r["unassigned_mass"] for r in rows.values()]
    if variant == "softmax":
        assert max(abs(m) for m in mass) < 1e-6
    else:
        assert min(mass) > 1e-3  # query 0 alone leaves 1/(1+e^s) > 0 on "nothing"


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_matches_hand_loop_over_whole_split():
    model = tiny("softmax1")
    ds = dataset(n_val=1000)  # 999 predictions = 31 windows of 32 + a tail of 7
    m = measure(model, ds, quant=(), n_sequences=5, batch_size=4)
    nll, n = 0.0, 0
    T = 32
    with torch.no_grad():
        for start in range(0, len(ds.val) - 1, T):
            chunk = torch.from_numpy(ds.val[start:start + T + 1].astype(np.int64))
            x, y = chunk[:-1], chunk[1:]
            logits, _ = model(x[None])
            nll += float(F.cross_entropy(logits[0].double(), y, reduction="sum"))
            n += y.numel()
    assert n == len(ds.val) - 1 == m.perplexity["tokens"]
    assert m.perplexity["fp"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert m.loss["fp"] == pytest.approx(nll / n, rel=1e-6)
    assert eval_windows(1000, 32)[-1] == (31 * 32, 7)
    assert m.n_sequences == 5
    assert {a["site"] for a in m.activations} == {"embeddings", "attn_out", "mlp_hidden", "mlp_out",
                                                  "block_out", "attn_probs"}


def test_planted_outlier_is_found_at_its_layer_and_dimension():
    model = tiny("softmax", n_layer=3)
    dim = 11
    with torch.no_grad():  # one hidden dimension of layer 1's MLP output, 100x
        model.transformer.h[1].mlp.c_proj.weight[dim].mul_(100.0)
        model.transformer.h[1].mlp.c_proj.bias[dim] = 0.5
    m = measure(model, dataset(), quant=(), n_sequences=8)
    rows = {(a["site"], a["layer"]): a for a in m.activations}
    planted = rows[("mlp_out", 1)]
    assert planted["top_dims"][0]["dim"] == dim and planted["max"]["dim"] == dim
    assert planted["top_dims"][0]["max_abs"] > 20 * planted["top_dims"][1]["max_abs"]
    for layer in (0, 2):  # the other layers' MLP outputs have no such dimension
        assert rows[("mlp_out", layer)]["inf_norm_max"] < planted["inf_norm_max"] / 20
    assert rows[("mlp_out", 1)]["kurtosis"] > 5 * rows[("mlp_out", 0)]["kurtosis"]
    for layer in (1, 2):  # and it persists in the residual stream from there on
        assert rows[("block_out", layer)]["top_dims"][0]["dim"] == dim
    assert rows[("block_out", 0)]["top_dims"][0]["dim"] != dim or \
        rows[("block_out", 0)]["inf_norm_max"] < planted["inf_norm_max"] / 20
    at = m.summary["act_inf_norm_max_at"]
    assert at["dim"] == dim and at["layer"] >= 1


# ----------------------------------------------------------------------------- the report


@pytest.mark.slow
def test_measurement_json_contract_and_model_untouched():
    model = tiny("softmax1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    m = measure(model, dataset(), quant=("w8a8", "w4a8"), n_sequences=4, calib_batches=2,
                checkpoint="ck", data="synthetic")
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    for key in ("weights", "activations", "attention", "perplexity", "checkpoint", "data", "n_sequences", "wall_s"):
        assert key in d
    assert set(d["perplexity"]) == {"fp", "tokens", "w8a8", "w4a8"}
    assert set(d["weights"][0]) >= {"name", "layer", "kind", "numel", "kurtosis", "excess_kurtosis", "max_abs"}
    assert set(d["activations"][0]) >= {"site", "layer", "inf_norm_mean", "inf_norm_max", "kurtosis", "top_dims"}
    assert set(d["attention"][0]) == {"layer", "head", "unassigned_mass", "first_token_mass", "entropy"}
    assert d["checkpoint"] == "ck" and d["data"] == "synthetic" and d["n_sequences"] == 4


def test_measure_is_deterministic_for_a_seed():
    model, ds = tiny("softmax1"), dataset()
    a = measure(model, ds, quant=("w8a8",), n_sequences=4, calib_batches=2, seed=7).to_dict()
    b = measure(model, ds, quant=("w8a8",), n_sequences=4, calib_batches=2, seed=7).to_dict()
    assert a["perplexity"] == b["perplexity"] and a["activations"] == b["activations"]


def test_bad_data_is_a_one_line_error():
    model = tiny()
    with pytest.raises(QuietError, match="vocabulary") as e:
        measure(model, dataset(vocab=300), quant=())
    assert "\n" not in str(e.value)
    ds = dataset()
    ds.val = ds.val[:1]
    with pytest.raises(QuietError, match="fewer than 2 tokens"):
        measure(model, ds, quant=())
    with pytest.raises(QuietError, match="w<bits>a<bits>"):
        measure(model, dataset(), quant=("int8",))


def test_measure_leaves_the_callers_model_where_it_was():
    """Review defect: measure() moved the caller's model to its device. Measured on a device the model is not
    on, it works on a copy: here "meta", where the measurement itself cannot finish, and the caller's
    weights must still be on the CPU with their values."""
    model = tiny("softmax1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception):  # noqa: B017 (whatever meta tensors raise first)
        measure(model, dataset(), quant=[], n_sequences=2, device="meta")
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k
