"""Each paper's own outlier/sink statistic (collectors._PaperStats, registry's paper metrics) against an
independent computation: hand-built attention maps and activations with known answers, the papers' own
formulas re-derived in float64, scipy, and planted patterns in real models."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import scipy.stats
import torch

from quietgpt import GPT, GPTConfig
from quietgpt.measurement.collectors import BONDARENKO_MODULES, StatsCollector, row_kurtosis
from quietgpt.measurement.evaluate import measure
from quietgpt.measurement.registry import catalogue, eval_summary, study_metrics
from quietgpt.nn.softmax import softpick

PAPER_KEYS = ("sink_rate", "first_token_argmax_share", "massive_ratio_max", "massive_count",
              "bondarenko_max_inf_norm", "bondarenko_avg_kurtosis", "act_max_first_token", "act_max_other_tokens",
              "act_kurtosis_first_token", "act_kurtosis_other_tokens", "gate_mean", "attention_zero_share")


def tiny(attention: str = "softmax", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(block_size=96, vocab_size=48, n_layer=2, n_head=2, n_embd=16, attention=attention)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def dataset(vocab: int = 48, n_val: int = 1000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return types.SimpleNamespace(train=rng.integers(0, vocab, 4000).astype(np.uint16),
                                 val=rng.integers(0, vocab, n_val).astype(np.uint16), vocab_size=vocab)


def observe(model: GPT, x: torch.Tensor, **kw) -> StatsCollector:
    col = StatsCollector(**kw)
    col.tokens = x
    with torch.no_grad(), model.observe(col):
        model(x)
    return col


# ----------------------------------------------------------------------------- Gu et al.: sink rate


def gu_sink_rate(p: np.ndarray, eps: float) -> float:
    """Gu et al.'s Sink_1^eps re-derived from their eval_sink_open_source.py: p (N, L, H, T, T) attention of
    T-token inputs; each key's importance = the sum of its column over queries / (T - k), the number of
    queries that see it; then the share over samples, layers and heads of importance[first key] > eps."""
    T = p.shape[-1]
    importance = (p / np.arange(T, 0, -1)[None, None, None, None, :]).sum(axis=-2)  # (N, L, H, T)
    return float((importance[..., 0] > eps).mean())


def planted_attention(T: int) -> np.ndarray:
    """(2 sequences, 3 heads, T, T) causal attention: head 0 puts 0.6 of every query's mass on key 0 and
    spreads 0.4 over keys 1..q (a sink); head 1 puts 0.9 on the query's own key and spreads 0.1 over keys
    0..q; head 2 is the sink in sequence 0 and the self-attending head in sequence 1."""
    sink, diag = np.zeros((T, T)), np.zeros((T, T))
    sink[0, 0] = diag[0, 0] = 1.0  # query 0 sees key 0 alone
    for q in range(1, T):
        sink[q, 0], sink[q, 1:q + 1] = 0.6, 0.4 / q
        diag[q, :q + 1] = 0.1 / (q + 1)
        diag[q, q] += 0.9
    return np.stack([np.stack([sink, diag, sink]), np.stack([sink, diag, diag])])


def test_sink_rate_on_planted_attention_matches_gu_formula():
    T = 80  # longer than Gu et al.'s 64 tokens: only the first 64 queries enter alpha
    p = planted_attention(T)
    col = StatsCollector()
    col("attn_probs", 0, torch.tensor(p, dtype=torch.float32))
    (row,) = col.sink_rows()
    assert row["tokens"] == 64 and row["eps"] == 0.3 and row["n_sequences"] == 2
    # by hand: head 0 always a sink, head 1 never, head 2 in one of two sequences
    assert [h["sink_share"] for h in row["heads"]] == [1.0, 0.0, 0.5]
    assert row["sink_rate"] == pytest.approx(gu_sink_rate(p[:, None, :, :64, :64], 0.3)) == pytest.approx(0.5)
    # alpha = mean over queries 0..63 (query 0 included) of the weight on key 0, in float64
    want = p[:, :, :64, 0].mean(-1).mean(0)
    assert [h["alpha"] for h in row["heads"]] == pytest.approx(want.tolist(), rel=1e-6)
    assert row["heads"][0]["alpha"] == pytest.approx(0.6 + 0.4 / 64, rel=1e-6)
    # first key strictly largest: always for the sink (0.6 > the rest), never for the self-attending head
    assert [h["first_token_argmax_share"] for h in row["heads"]] == pytest.approx([1.0, 0.0, 0.5])
    assert row["first_token_argmax_share"] == pytest.approx(0.5)


def test_sink_eps_and_ties():
    p = planted_attention(16)
    col = StatsCollector(sink_eps=0.65)  # head 0's alpha (0.6 + 0.4/16) is below 0.65
    col("attn_probs", 0, torch.tensor(p, dtype=torch.float32))
    assert col.sink_rows()[0]["sink_rate"] == 0.0
    # a query that puts (exactly) nothing anywhere does not attend maximally to the first token
    zeros = torch.zeros(1, 1, 8, 8)
    zeros[0, 0, 0, 0] = 1.0
    col = StatsCollector()
    col("attn_probs", 0, zeros)
    assert col.sink_rows()[0]["first_token_argmax_share"] == 0.0
    assert col.sink_rows()[0]["alpha_mean"] == pytest.approx(1 / 8)


def test_sink_rate_of_a_window_equals_gu_protocol_on_its_first_64_tokens():
    """Causal attention: the first 64 queries of a 96-token window see exactly what a 64-token forward
    sees, so the window's alpha is Gu et al.'s on a separate 64-token input."""
    model = tiny("softmax", seed=3)
    with torch.no_grad():  # sharpen the scores so heads differ
        for blk in model.transformer.h:
            blk.attn.c_attn.weight.mul_(6.0)
    x = torch.randint(0, 48, (4, 96), generator=torch.Generator().manual_seed(1))
    col = observe(model, x)
    got = {r["layer"]: r for r in col.sink_rows()}
    probs = {}
    with torch.no_grad(), model.observe(lambda s, layer, t: probs.__setitem__(layer, t.double().numpy()),
                                        sites=("attn_probs",)):
        model(x[:, :64])
    p = np.stack([probs[0], probs[1]], axis=1)  # (N, L, H, 64, 64)
    for eps in (0.05, 0.1, 0.3):
        col_eps = observe(model, x, sink_eps=eps)
        rate = np.mean([r["sink_rate"] for r in col_eps.sink_rows()])
        assert rate == pytest.approx(gu_sink_rate(p, eps), abs=1e-12)
    for layer in (0, 1):
        alpha = p[:, layer, :, :, 0].mean(-1).mean(0)  # (H,)
        assert [h["alpha"] for h in got[layer]["heads"]] == pytest.approx(alpha.tolist(), rel=1e-5)


# ----------------------------------------------------------------------------- Sun et al.: massive activations


def test_massive_activations_on_planted_values():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 16, 8, generator=g)
    t[0] *= 0.01  # sequence 0's median |x| is ~0.007: its own threshold is ~7, not the others' ~670
    t[0, 9, 6] = 160.0  # massive in sequence 0: > 100 and > 1000 x ITS median
    t[1, 5, 3] = -5000.0  # massive: > 100 and > 1000 x the median |x| (about 0.67)
    t[2, 9, 6] = 150.0  # over 100 but far below 1000 x its sequence's median
    tokens = torch.arange(48).reshape(3, 16)
    col = StatsCollector(top_k=3)
    col.tokens = tokens
    col("block_out", 2, t)
    (row,) = col.massive_rows()
    a = t.abs().reshape(3, -1).double().numpy()
    med = np.sort(a, axis=1)[:, (a.shape[1] - 1) // 2]  # torch.median's lower middle value, per sequence
    assert row["median_seq_mean"] == pytest.approx(med.mean(), rel=1e-6)
    assert row["top1_seq_mean"] == pytest.approx(a.max(1).mean(), rel=1e-6)
    assert row["ratio"] == pytest.approx(a.max(1).mean() / med.mean(), rel=1e-6)
    assert 0.001 < med[0] < 0.02 and 0.3 < med[1] < 1.5 and 0.3 < med[2] < 1.5
    assert (row["count_massive"], row["count_abs_over_100"], row["count_over_1000x_median"]) == (2, 3, 2)
    assert row["massive_per_sequence"] == pytest.approx(2 / 3)
    top = row["top"]
    assert (top[0]["value"], top[0]["dim"], top[0]["position"], top[0]["token"]) == (-5000.0, 3, 5, 21)
    assert (top[1]["value"], top[1]["dim"], top[1]["position"], top[1]["token"]) == (160.0, 6, 9, 9)
    assert (top[2]["value"], top[2]["dim"], top[2]["position"], top[2]["token"]) == (150.0, 6, 9, 41)


def test_massive_top_k_merges_over_batches():
    col = StatsCollector(top_k=2)
    for b, v in enumerate((3.0, 9.0, 5.0)):
        t = torch.full((1, 4, 2), 0.5)
        t[0, b, 1] = v
        col("block_out", 0, t)
    (row,) = col.massive_rows()
    assert [e["abs"] for e in row["top"]] == [9.0, 5.0] and row["top"][0]["position"] == 1
    assert row["n_sequences"] == 3 and row["median_seq_mean"] == 0.5


def test_planted_massive_dimension_in_a_model_is_counted_everywhere():
    """A bias of 500 on one residual dimension of layer 0's MLP output puts a massive value at every
    position of every block output from layer 0 on; nothing else in an untrained model comes near 100."""
    model = tiny("softmax1", n_layer=3)
    dim = 5
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias[dim] = 500.0
    ev = measure(model, dataset(), quant=(), n_sequences=4).to_dict()
    T, n_layer = 96, 3
    for row in ev["massive"]:
        assert row["count_massive"] == 4 * T and row["massive_per_sequence"] == T
        assert all(e["dim"] == dim for e in row["top"])
        assert row["ratio"] > 1000
    assert ev["summary"]["massive_count"] == n_layer * T
    assert ev["summary"]["massive_ratio_max"] == max(r["ratio"] for r in ev["massive"])
    # Kaul et al.'s first-token vs other-token max |x| sees it at both
    assert ev["summary"]["act_max_first_token"] > 400 and ev["summary"]["act_max_other_tokens"] > 400


# ----------------------------------------------------------------------------- Kaul et al.: first vs other tokens


def test_first_token_statistics_against_scipy():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 12, 32, generator=g)
    t[:, 0, 7] = 60.0  # the first token carries one huge dimension in every sequence
    t[2, 5, 1] = 9.0
    col = StatsCollector()
    col("block_out", 0, t)
    (row,) = col.first_token_rows()
    x = t.double().numpy()
    k = scipy.stats.kurtosis(x, axis=-1, fisher=False, bias=True)  # (B, T): each token over its 32 dims
    assert row["kurtosis_first"] == pytest.approx(k[:, 0].mean(), rel=1e-9)
    assert row["kurtosis_other"] == pytest.approx(k[:, 1:].mean(), rel=1e-9)
    assert row["kurtosis_first"] > 25  # one 60 among 31 standard normals: near a lone spike's 30.03
    assert row["max_first"] == pytest.approx(60.0)
    assert row["max_other"] == pytest.approx(np.abs(x[:, 1:]).max(axis=(1, 2)).mean(), rel=1e-9)
    assert row_kurtosis(torch.ones(3, 5)).isnan().all()  # constant rows: undefined, then skipped


def test_single_position_windows_have_no_other_tokens():
    col = StatsCollector()
    col("block_out", 0, torch.randn(2, 1, 8))
    col("attn_probs", 0, torch.ones(2, 2, 1, 1))
    assert col.first_token_rows()[0]["max_other"] is None and col.first_token_rows()[0]["kurtosis_other"] is None
    assert col.sink_rows()[0]["first_token_argmax_share"] is None
    assert col.sink_rows()[0]["sink_rate"] == 1.0  # query 0 puts everything on key 0


# ----------------------------------------------------------------------------- Bondarenko et al.


def their_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Bondarenko et al.'s utils.kurtosis, re-derived: mean((x - mu)^4) / (std_unbiased^4 + 1e-6) per row."""
    mu = x.mean(dim=1, keepdim=True)
    return ((x - mu) ** 4).mean(dim=1) / (x.std(dim=1) ** 4 + 1e-6)


def test_bondarenko_modules_and_reductions_against_module_hooks():
    model = tiny("gated", n_layer=2)
    with torch.no_grad():  # make the branch outputs large enough for their eps to be negligible
        for blk in model.transformer.h:
            blk.attn.c_proj.weight.mul_(40.0)
            blk.mlp.c_proj.weight.mul_(40.0)
    x = torch.randint(0, 48, (3, 40), generator=torch.Generator().manual_seed(2))
    col = observe(model, x)
    rows = col.bondarenko_rows()
    # their ACT_KEYS, mapped: 5 per layer in their order, plus the final LayerNorm
    names = [f"transformer.h.{j}{m}" for j in range(2) for m in (".ln_1", ".attn.c_proj", ".ln_2", ".mlp.c_proj", "")]
    assert [r["module"] for r in rows] == [*names, "transformer.ln_f"]
    # every module's OUTPUT, by plain forward hooks on the named modules (not through GPT.observe)
    outs, modules = {}, dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o.detach().double()))
             for n in [r["module"] for r in rows]]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for r in rows:
        flat = outs[r["module"]].reshape(3, -1)
        assert r["inf_norm_seq_mean"] == pytest.approx(float(flat.abs().amax(1).mean()), rel=1e-6)
        pearson = scipy.stats.kurtosis(flat.numpy(), axis=1, fisher=False, bias=True)
        assert r["kurtosis_seq_mean"] == pytest.approx(pearson.mean(), rel=1e-6)
        # their formula differs from Pearson's by ((n - 1) / n)^2 and the eps: negligible at these scales
        n = flat.shape[1]
        if r["site"] in ("ln1_out", "ln2_out", "lnf_out"):  # std ~1 >> their eps^(1/4)
            assert float(their_kurtosis(flat).mean()) == pytest.approx(pearson.mean() * ((n - 1) / n) ** 2, rel=1e-5)
    ev = {"bondarenko": rows}
    cat = catalogue(())
    assert cat["bondarenko_max_inf_norm"].value(ev) == max(r["inf_norm_seq_mean"] for r in rows)
    assert cat["bondarenko_avg_kurtosis"].value(ev) == pytest.approx(np.mean([r["kurtosis_seq_mean"] for r in rows]))
    assert set(BONDARENKO_MODULES) == {r["site"] for r in rows}


# ----------------------------------------------------------------------------- Qiu et al.: gates


def test_gate_mean_against_hand_gate_values():
    model = tiny("gated")
    with torch.no_grad():
        for blk in model.transformer.h:
            blk.attn.gate.weight.normal_(0.0, 1.0)
    x = torch.randint(0, 48, (2, 24), generator=torch.Generator().manual_seed(3))
    col = observe(model, x)
    ln1 = {}
    hooks = [blk.ln_1.register_forward_hook(lambda _m, _i, o, j=j: ln1.__setitem__(j, o.detach().double()))
             for j, blk in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rows = col.gate_rows()
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        gate = model.transformer.h[r["layer"]].attn.gate
        w, b = gate.weight.detach().double(), gate.bias.detach().double()
        xs = ln1[r["layer"]].view(2, 24, 2, 8)  # (B, T, H, D): each head reads its slice
        g = torch.sigmoid(torch.einsum("bthd,hd->bht", xs, w) + b[None, :, None])
        assert r["mean"] == pytest.approx(float(g.mean()), rel=1e-6)
        assert r["heads"] == pytest.approx(g.mean(dim=(0, 2)).tolist(), rel=1e-6)
    assert observe(tiny("softmax1"), x).gate_rows() == []


# ----------------------------------------------------------------------------- Zuhri et al.: exact zeros


def test_zero_share_of_hand_built_softpick_scores():
    """softpick gives exactly 0 to every score <= 0. Planted scores (2 sequences, 3 heads, T = 5), counted by
    hand over the 15 visible pairs (key <= query) of each head and sequence: head 0 scores +1 everywhere (no
    zero), head 1 -1 everywhere (15 zeros), head 2 +1 on even keys, -0.5 on odd keys and exactly 0 on key 3
    (queries 0..4 see 0, 1, 1, 2, 2 odd keys: 6 zeros). The 10 masked future pairs per head are zeros too
    and must not count: counted, head 0's share would be 10/25, not 0."""
    T = 5
    scores = torch.empty(2, 3, T, T)
    scores[:, 0], scores[:, 1] = 1.0, -1.0
    scores[:, 2] = torch.tensor([1.0, -0.5, 1.0, 0.0, 1.0])
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    p = softpick(scores.masked_fill(future, -math.inf))
    assert int((p[:, :, future] == 0).sum()) == 2 * 3 * 10  # the mask's zeros exist, and are left out below
    col = StatsCollector()
    col("attn_probs", 0, p)
    (row,) = col.sparsity_rows()
    assert [h["zeros"] for h in row["heads"]] == [0, 2 * 15, 2 * 6]
    assert [h["zero_share"] for h in row["heads"]] == [0.0, 1.0, 6 / 15]
    assert row["zeros"] == 42 and row["visible"] == 2 * 3 * 15 and row["zero_share"] == 42 / 90
    # a second batch accumulates: the same counts again, the same shares
    col("attn_probs", 0, p)
    assert col.sparsity_rows()[0]["visible"] == 180 and col.sparsity_rows()[0]["zero_share"] == 42 / 90
    ev = {"sparsity": [row, {**row, "layer": 1, "zero_share": 0.0}]}
    assert catalogue()["attention_zero_share"].value(ev) == pytest.approx((42 / 90 + 0.0) / 2)


def test_zero_share_of_a_softpick_model_is_the_count_of_its_reference_weights_zeros():
    """A tiny softpick model: the collector's counts equal a count made here, pair by pair, from the
    reference weights the model's attention tap sees, and agree with the sign of hand-computed float64
    scores (softpick is 0 exactly where the score is <= 0) except where a score is within rounding of 0."""
    model = tiny("softpick", seed=5)
    with torch.no_grad():  # sharpen the scores so both signs are common and few sit near 0
        for blk in model.transformer.h:
            blk.attn.c_attn.weight.mul_(8.0)
    x = torch.randint(0, 48, (3, 40), generator=torch.Generator().manual_seed(2))
    weights, ln1 = {}, {}
    hooks = [blk.ln_1.register_forward_hook(lambda _m, _i, o, j=j: ln1.__setitem__(j, o.detach().double()))
             for j, blk in enumerate(model.transformer.h)]
    with torch.no_grad(), model.observe(lambda s, layer, t: weights.__setitem__(layer, t.clone()),
                                        sites=("attn_probs",)):
        model(x)
    for h in hooks:
        h.remove()
    rows = {r["layer"]: r for r in observe(model, x).sparsity_rows()}
    B, H, T, D = 3, 2, 40, 8
    for layer in (0, 1):
        p = weights[layer].numpy()
        by_hand = [sum(int(p[b, h, q, k] == 0) for b in range(B) for q in range(T) for k in range(q + 1))
                   for h in range(H)]
        r = rows[layer]
        assert [h["zeros"] for h in r["heads"]] == by_hand
        assert r["visible"] == H * B * T * (T + 1) // 2 and r["zero_share"] == sum(by_hand) / r["visible"]
        assert 0.2 < r["zero_share"] < 0.8  # not a trivial all-or-nothing count
        attn = model.transformer.h[layer].attn
        qkv = ln1[layer] @ attn.c_attn.weight.detach().double().t() + attn.c_attn.bias.detach().double()
        q, k, _ = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        visible = torch.ones(T, T, dtype=torch.bool).tril()
        differ = ((s <= 0) != torch.from_numpy(p == 0)) & visible
        assert bool((s[differ].abs() < 1e-5).all()), s[differ]  # only scores within float32 rounding of 0
        assert int(differ.sum()) <= 2


def test_zero_share_in_the_eval_json_is_measured_for_every_variant():
    """measure() carries the sparsity section and the summary key; softmax's weights are never 0 here (no
    underflow in a tiny model), so its share is a measured 0, not missing; softpick's is well above it."""
    ds = dataset()
    soft = measure(tiny("softmax"), ds, quant=(), n_sequences=2).to_dict()
    pick = measure(tiny("softpick"), ds, quant=(), n_sequences=2).to_dict()
    assert [r["layer"] for r in pick["sparsity"]] == [0, 1] and len(pick["sparsity"][0]["heads"]) == 2
    assert pick["sparsity"][0]["visible"] == 2 * 2 * 96 * 97 // 2  # 2 sequences, 2 heads, T = 96
    assert soft["summary"]["attention_zero_share"] == 0.0
    assert pick["summary"]["attention_zero_share"] == pytest.approx(
        np.mean([r["zero_share"] for r in pick["sparsity"]])) and pick["summary"]["attention_zero_share"] > 0.1


# ----------------------------------------------------------------------------- the registry and the eval JSON


def test_measure_carries_every_paper_metric_and_leaves_the_old_sections_alone():
    model, ds = tiny("gated"), dataset()
    ev = json.loads(json.dumps(measure(model, ds, quant=("w8a8",), n_sequences=4, calib_batches=2).to_dict(),
                               allow_nan=False))
    for section in ("sinks", "massive", "bondarenko", "first_token", "gates", "sparsity"):
        assert ev[section], section
    assert [r["layer"] for r in ev["sinks"]] == [0, 1] and len(ev["sinks"][0]["heads"]) == 2
    assert ev["massive"][0]["n_sequences"] == 4 and len(ev["massive"][0]["top"]) == 5
    assert len(ev["bondarenko"]) == 2 * 5 + 1
    s = ev["summary"]
    for key in PAPER_KEYS:
        assert isinstance(s[key], float) and math.isfinite(s[key]), key
    assert s == {**s, **eval_summary(ev, ["w8a8"])}
    assert s["sink_rate"] == pytest.approx(np.mean([r["sink_rate"] for r in ev["sinks"]]))
    assert s["gate_mean"] == pytest.approx(np.mean([r["mean"] for r in ev["gates"]]))
    assert 0 < s["gate_mean"] < 1
    # the six old sites only in "activations", attention rows unchanged in shape
    assert {a["site"] for a in ev["activations"]} == {"embeddings", "attn_out", "mlp_hidden", "mlp_out", "block_out",
                                                      "attn_probs"}
    assert set(ev["attention"][0]) == {"layer", "head", "unassigned_mass", "first_token_mass", "entropy"}
    no_gate = measure(tiny("softmax1"), ds, quant=(), n_sequences=4).to_dict()
    assert no_gate["gates"] == [] and no_gate["summary"]["gate_mean"] is None


def test_old_statistics_are_bit_identical_with_the_new_sites_observed():
    """The paper statistics only add: the activation and attention rows of a collector that sees every
    site equal, exactly, those of one that sees only the six original sites."""
    model = tiny("softmax1")
    x = torch.randint(0, 48, (3, 96), generator=torch.Generator().manual_seed(4))
    full = observe(model, x)
    old = StatsCollector()
    old.tokens = x
    with torch.no_grad(), model.observe(old, sites=("embeddings", "attn_out", "mlp_hidden", "mlp_out", "block_out",
                                                    "attn_probs")):
        model(x)
    assert full.activation_rows() == old.activation_rows()
    assert full.attention_rows() == old.attention_rows()


def test_registry_flags_of_the_paper_metrics():
    cat = catalogue(("w8a8",))
    for key in PAPER_KEYS:
        m = cat[key]
        assert m.study and m.compared and m.source == "eval" and m.paper, key
        assert m.headline == (key in ("sink_rate", "bondarenko_max_inf_norm")), key
    assert cat["sink_rate"].higher_is_worse is True and cat["gate_mean"].higher_is_worse is None
    assert cat["attention_zero_share"].higher_is_worse is None and "Softpick" in cat["attention_zero_share"].paper
    assert "Gu et al." in cat["sink_rate"].paper and "Sun et al." in cat["massive_count"].paper
    assert "Kaul et al." in cat["act_kurtosis_first_token"].paper and "Qiu et al." in cat["gate_mean"].paper
    assert cat["bondarenko_max_inf_norm"].label.startswith("max inf. norm")
    assert cat["bondarenko_avg_kurtosis"].label.startswith("avg. kurtosis")
    assert set(PAPER_KEYS) <= set(study_metrics(("w8a8",)))
    assert all(cat[k].value({}) is None for k in PAPER_KEYS)  # absent sections: missing, never 0 or NaN
