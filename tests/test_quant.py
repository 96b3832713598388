"""quant/: the spec grammar, grids against hand-computed values and error bounds, and the quantized copy
against the float model. The methods (GPTQ, the transforms, the KV cache) are in test_quant_methods.py."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from quietgpt import GPT, GPTConfig, QuietError
from quietgpt.measurement.evaluate import measure
from quietgpt.quant.grids import ActQuantizer, asymmetric_params, fake_quant, quantize_weight, symmetric_scale
from quietgpt.quant.simulated import quantized
from quietgpt.quant.spec import parse_quant, parse_quant_list


def tiny(attention: str = "softmax1", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=48, n_layer=2, n_head=2, n_embd=16, attention=attention)).eval()


def tokens(n: int, b: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 48, (b, 32), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------- config names


def test_parse_quant_names_and_options():
    c = parse_quant("W8A8")
    assert (c.name, c.w_bits, c.a_bits, c.per_channel, c.weight_range, c.percentile) == ("w8a8", 8, 8, False,
                                                                                         "minmax", None)
    c = parse_quant("w4a8-pc-mse-p99.9-nohead-noemb")
    assert (c.w_bits, c.a_bits, c.per_channel, c.weight_range, c.percentile, c.head, c.embeddings) == (
        4, 8, True, "mse", 99.9, False, False)
    assert [q.name for q in parse_quant_list("w8a8, w6a8,w8a8,,w16a16")] == ["w8a8", "w6a8", "w16a16"]
    assert parse_quant_list("") == []
    c = parse_quant("w4a8-kv4-g64-rot-gptq-ao-e8")
    assert (c.granularity, c.group_size, c.method, c.act_order, c.rotate, c.kv_bits, c.emb_bits, c.head_bits) == (
        "group", 64, "gptq", True, True, 4, 8, 8)
    assert c.name == "w4a8-g64-gptq-ao-rot-kv4-e8"
    assert parse_quant("w8a8-smooth").smooth == 0.5 and parse_quant("w8a8-smooth0.8").name == "w8a8-smooth0.8"
    assert parse_quant("w8a8-qkv").qkv and parse_quant("int8-dynamic").kind == "dynamic"


@pytest.mark.parametrize("spec, emb", [("w4a8", 4), ("w4a8-pc", 4), ("w4a8-g32-mse", 4), ("w4a8-gptq", None),
                                       ("w4a8-rot", None), ("w8a8-smooth", None), ("w4a8-gptq-e8", 8),
                                       ("w4a8-e8", 8), ("w4a8-efp", None)])
def test_embeddings_and_head_follow_each_methods_paper_unless_given(spec, emb):
    """Round-to-nearest (Bondarenko et al.'s protocol) quantizes them at W bits; GPTQ, QuaRot and SmoothQuant
    keep them in float, as their papers do; e<B> / efp say it outright."""
    c = parse_quant(spec)
    assert c.emb_bits == c.head_bits == emb


def test_one_canonical_name_per_configuration():
    """Review defect: the name was the lower-cased input, so the order of the parts (or 99.9 vs 99.90) made two
    configs, two metric columns and two Holm comparisons of one configuration."""
    assert parse_quant("w4a8-mse-pc").name == parse_quant("w4a8-pc-mse").name == "w4a8-pc-mse"
    assert parse_quant("w8a8-p99.90").name == parse_quant("W8A8-p99.9").name == "w8a8-p99.9"
    assert parse_quant("w4a8-nohead-pc-noemb").name == "w4a8-pc-efp"  # both in float: efp
    assert parse_quant("w4a8-nohead-pc").name == "w4a8-pc-nohead"
    assert parse_quant("w4a8-gptq-efp").name == "w4a8-gptq"  # its default, left out
    assert parse_quant("w4a8-e4").name == "w4a8"
    assert parse_quant("e8-w4a8".split("-")[1] + "-e8-g64-gptq").name == "w4a8-g64-gptq-e8"
    assert [q.name for q in parse_quant_list("w4a8-pc-mse,w4a8-mse-pc,w8a8-p99.90,w8a8-p99.9")] == [
        "w4a8-pc-mse", "w8a8-p99.9"]
    with pytest.raises(QuietError, match="both set"):
        parse_quant("w4a8-pc-pc")


@pytest.mark.parametrize("bad, part", [("int8", "'int8'"), ("w8", "'w8'"), ("w1a8", "2..16"), ("w8a17", "2..16"),
                                       ("w8a8-foo", "'foo'"), ("w8a8-p20", "(50, 100]"), ("8a8", "'8a8'"),
                                       ("w3a99", "got 99"), ("w4a8-pc-g32", "-pc and -g32"),
                                       ("w4a8-ao", "-ao"), ("w4a8-smooth-rot", "choose one"),
                                       ("w4a8-qkv-kv4", "choose one"), ("w4a8-kv1", "2..16"),
                                       ("w8a8-smooth1.5", "'smooth1.5'"), ("w4a8-g0", "at least 1")])
def test_bad_specs_are_one_short_line_naming_the_part(bad, part):
    """One line under 200 characters that names the spec and the part it could not read, and where the
    grammar is documented (today's message for w3a99 recited the whole grammar in 400+ characters)."""
    with pytest.raises(QuietError) as e:
        parse_quant(bad)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200 and repr(bad) in msg and part in msg, msg
    assert "docs/quantization.md" in msg


# ----------------------------------------------------------------------------- grids


def test_fake_quant_hand_example():
    # scale 0.1, zero point 3, 4-bit unsigned grid [0, 15]: representable range [-0.3, 1.2]
    x = torch.tensor([0.04, 0.26, -0.31, 2.0, -1.0, 0.66])
    want = torch.tensor([0.0, 0.3, -0.3, 1.2, -0.3, 0.7])
    assert torch.allclose(fake_quant(x, 0.1, 3, 0, 15), want, atol=1e-6)
    # the fused kernel the activation quantizer uses puts values on the same grid
    assert torch.allclose(torch.fake_quantize_per_tensor_affine(x, 0.1, 3, 0, 15), want, atol=1e-6)
    # asymmetric params by hand: range [-1, 3] over 8 bits -> scale 4/255, zero point round(255/4) = 64
    scale, zp = asymmetric_params(-1.0, 3.0, 8)
    assert scale == pytest.approx(4 / 255) and zp == 64
    assert asymmetric_params(0.5, 2.0, 8) == (pytest.approx(2 / 255), 0)  # the range is widened to include 0
    # symmetric: max |w| = 2.54 over 8 bits -> scale 0.02, grid [-128, 127]
    assert float(symmetric_scale(torch.tensor(2.54), 8)) == pytest.approx(0.02)
    w = torch.tensor([[2.54, -2.54, 0.011, 0.009]])
    assert torch.allclose(quantize_weight(w, 8), torch.tensor([[2.54, -2.54, 0.02, 0.0]]), atol=1e-6)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_activation_error_bound_inside_range(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.rand(10000, generator=g) * 7 - 2  # in [-2, 5]
    q = ActQuantizer(bits)
    y = q(x)
    assert q.xmin == pytest.approx(float(x.min())) and q.xmax == pytest.approx(float(x.max()))
    assert float((x - y).abs().max()) <= q.scale / 2 + 1e-6
    assert len(torch.unique(y)) <= 2**bits
    assert torch.allclose(y, fake_quant(x, q.scale, q.zero_point, 0, 2**bits - 1), atol=1e-6)
    assert torch.allclose(y, torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, 0, 2**bits - 1),
                          atol=1e-6)
    q.calibrating = False  # outside the fixed range values clamp to its ends
    assert float(q(torch.tensor([100.0]))) == pytest.approx(q.scale * (2**bits - 1 - q.zero_point), rel=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_quantization_grid_and_bound(per_channel):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 50, generator=g) * torch.logspace(-2, 1, 8)[:, None]  # rows of very different scale
    wq = quantize_weight(w, 8, per_channel=per_channel)
    absmax = w.abs().amax(1, keepdim=True) if per_channel else w.abs().max()
    scale = absmax / 127
    assert torch.all((w - wq).abs() <= scale / 2 + 1e-7)
    assert torch.allclose(torch.round(wq / scale), wq / scale, atol=1e-4)  # on the grid
    assert torch.allclose(wq.abs().amax(1 if per_channel else None), w.abs().amax(1 if per_channel else None))
    if not per_channel:  # one scale for all rows crushes the small rows; per channel does not
        assert float((w - wq)[0].abs().max()) > float((w - quantize_weight(w, 8, per_channel=True))[0].abs().max())


def test_mse_range_beats_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    w[0, 0] = 40.0  # one outlier weight
    err = {m: float((quantize_weight(w, 4, method=m) - w).pow(2).sum()) for m in ("minmax", "mse")}
    assert err["mse"] < 0.5 * err["minmax"]


def test_running_minmax_momentum_and_percentile():
    q = ActQuantizer(8, momentum=0.9)
    for lo, hi in [(-1.0, 1.0), (-3.0, 5.0), (0.0, 2.0)]:
        q(torch.tensor([lo, hi, 0.5 * (lo + hi)]))
    # by hand: (-1, 1) -> (0.1*-3 + 0.9*-1, 0.1*5 + 0.9*1) = (-1.2, 1.4) -> (0.9*-1.2, 0.1*2 + 0.9*1.4)
    assert (q.xmin, q.xmax) == (pytest.approx(-1.08), pytest.approx(1.46))
    x = torch.cat([torch.linspace(-1, 1, 9999), torch.tensor([1000.0])])
    p = ActQuantizer(8, percentile=99.9)
    p(x)
    assert p.xmax < 1.01 and p.xmin == pytest.approx(-1.0, abs=2e-3)


# ----------------------------------------------------------------------------- the quantized model


def test_the_quantized_copy_quantizes_every_point_and_leaves_the_model():
    model = tiny("softmax1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    with quantized(model, parse_quant("w8a8"), tokens(3)) as st:
        q_model = st.model
        assert q_model is not model
        # hooks registered after the quantizers see the quantized tensors
        blk = q_model.transformer.h[1]
        taps = {"c_fc_out": blk.mlp.c_fc, "probs": blk.attn.core.tap_probs, "resid": blk.tap_resid,
                "block_out": blk.tap_out, "logits": q_model.lm_head}
        for k, m in taps.items():
            m.register_forward_hook(lambda _m, _i, out, k=k: seen.setdefault(k, out.detach()))
        with torch.no_grad():
            q_model(tokens(1, seed=9)[0])
        for key, name in [("c_fc_out", "transformer.h.1.mlp.c_fc.out"), ("probs", "h.1.attn_probs"),
                          ("resid", "h.1.resid_attn"), ("block_out", "h.1.block_out"), ("logits", "lm_head.out")]:
            q = st.act[name]
            levels = seen[key] / q.scale + q.zero_point
            assert torch.allclose(levels, torch.round(levels), atol=1e-3), key  # on the quantizer's grid
            assert len(torch.unique(seen[key])) <= 256
        assert set(q_model.attention_paths()) == {"reference"}
        assert len(torch.unique(q_model.transformer.h[0].attn.c_attn.weight)) <= 255
        assert "transformer.h.0.mlp.c_fc.weight" in st.weights and "lm_head.weight" in st.weights
        assert "transformer.wte.weight" not in st.weights  # tied to lm_head: quantized once
        assert all(q.xmin is not None for q in st.act.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("variant", ["softmax", "softmax_n", "sink", "clipped", "gated", "kvbias", "outgate"])
def test_every_variant_quantizes_and_leaves_the_model(variant):
    model = tiny(variant)
    x = tokens(1, seed=5)[0]
    with torch.no_grad():
        want, _ = model(x)
        with quantized(model, parse_quant("w8a8"), tokens(2)) as st:
            got, _ = st.model(x)
            assert set(st.model.attention_paths()) == {"reference"}
        again, _ = model(x)
    assert torch.equal(want, again)
    assert 0 < float((got - want).abs().max()) < 0.5  # quantization changes the logits, a little
    if variant == "gated":
        assert "transformer.h.0.attn.gate.weight" in st.weights and "transformer.h.0.attn.gate.out" in st.act


def test_nohead_keeps_the_tied_matrix_and_logits_float_and_e8_sets_their_bits():
    model = tiny()
    wte = model.transformer.wte.weight.detach()
    with quantized(model, parse_quant("w4a8-nohead"), tokens(1)) as st:
        assert torch.equal(st.model.transformer.wte.weight, wte)
        assert not any(k.startswith("lm_head") for k in st.act)
    with quantized(model, parse_quant("w4a8"), tokens(1)) as st:
        w4 = st.model.transformer.wte.weight.detach().clone()
        assert st.model.lm_head.weight is st.model.transformer.wte.weight  # still one matrix
    with quantized(model, parse_quant("w4a8-e8"), tokens(1)) as st:
        w8 = st.model.transformer.wte.weight.detach().clone()
        c_attn = st.model.transformer.h[0].attn.c_attn.weight
        assert len(torch.unique(c_attn)) <= 15 < len(torch.unique(w8)) <= 255
    assert len(torch.unique(w4)) <= 15  # per tensor at 4 bits: at most 15 levels (-7..7) in use
    assert float((w8 - wte).abs().max()) < float((w4 - wte).abs().max())


def test_only_quantizes_just_the_named_groups():
    """The sensitivity analysis quantizes one group at a time: with only={"h1.mlp_in"} that weight alone is on
    a grid and no activation is quantized; with an activation group, just its quantizers exist."""
    model = tiny("softmax")
    with quantized(model, parse_quant("w4a8"), tokens(1), only={"h1.mlp_in"}) as st:
        assert st.weights == ["transformer.h.1.mlp.c_fc.weight"] and st.act == {}
        assert not torch.equal(st.model.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)
        assert torch.equal(st.model.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
        assert set(st.model.attention_paths()) == {"sdpa"}  # nothing observes the probabilities: the fast path
    with quantized(model, parse_quant("w4a8"), tokens(1), only={"act.h0.attn"}) as st:
        assert st.weights == [] and set(st.act) == {"h.0.attn_probs"}
    with pytest.raises(QuietError, match="unknown quantization group"):
        with quantized(model, parse_quant("w4a8"), tokens(1), only={"h9.qkv"}):
            pass


def test_16_bit_reproduces_fp_perplexity_and_fewer_bits_hurt():
    model = tiny("softmax")
    rng = np.random.default_rng(0)
    ds = types.SimpleNamespace(train=rng.integers(0, 48, 4000), val=rng.integers(0, 48, 1500), vocab_size=48)
    with torch.no_grad():  # a sharper model, so quantization noise shows in the loss
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    m = measure(model, ds, quant=("w16a16", "w8a8", "w3a3"), n_sequences=2, calib_batches=4)
    ppl = m.perplexity
    assert ppl["w16a16"] == pytest.approx(ppl["fp"], rel=1e-3)
    assert abs(ppl["w3a3"] - ppl["fp"]) > abs(ppl["w8a8"] - ppl["fp"])


def test_no_calibration_is_an_error():
    with pytest.raises(QuietError, match="calibration"), quantized(tiny(), parse_quant("w8a8"), []):
        pass
