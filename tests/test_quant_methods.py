"""The quantization methods against independent references: GPTQ against a direct float64 implementation of
the reference algorithm (and never worse than round-to-nearest on the calibration data), the transforms
against the float logits for every attention variant, group scales and the KV cache against hand-quantized
tensors, a rotation against a planted massive activation, KL and top-1 agreement against a float64
computation."""

from __future__ import annotations

import copy
import math
import types

import numpy as np
import pytest
import torch

from quietgpt import GPT, GPTConfig
from quietgpt.measurement.evaluate import measure
from quietgpt.measurement.perplexity import eval_windows
from quietgpt.nn.variants import VARIANTS
from quietgpt.quant.gptq import Hessian, gptq_quantize
from quietgpt.quant.grids import quantize_per_vector, quantize_weight
from quietgpt.quant.simulated import quant_groups, quantized
from quietgpt.quant.spec import parse_quant
from quietgpt.quant.transforms import hadamard, rotate_residual, rotation_matrix, smooth

# ----------------------------------------------------------------------------- GPTQ


def sym_quant(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lim = 2 ** (bits - 1)
    return torch.clamp(torch.round(w / scale), -lim, lim - 1) * scale


def reference_gptq(W, H, bits, *, granularity="channel", group=None, act_order=False, damp=0.01):
    """GPTQ written directly from the paper (Frantar et al. 2023, Algorithm 1 without lazy batches), float64:
    columns in order (by decreasing H_jj with act-order); each is rounded, its error (w - q) / [H^-1]_jj is
    spread over the columns still to come through the row of H^-1, and H^-1 loses that column (the
    Optimal Brain Surgeon downdate). Group scales: max |w| / (2^(b-1) - 1) of the group's columns when the
    group's first column comes up, read from the weights as the reference code reads them (W at the start of
    the 128-column block; here the blocks are a detail of the fast code, so the test uses group sizes that
    divide 128 and start groups only at block starts or reads them the same way)."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    qmax = 2 ** (bits - 1) - 1
    if granularity == "channel":
        scale = W.abs().amax(1, keepdim=True) / qmax
    elif granularity == "tensor":
        scale = W.abs().max() / qmax
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(n)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    block_start = W.clone()  # what the reference's group search reads: W as the last 128-column block left it
    for j in range(n):
        if j % 128 == 0:
            block_start = W.clone()
        if granularity == "group" and j % group == 0:
            scale = block_start[:, j:j + group].abs().amax(1, keepdim=True) / qmax
        q = sym_quant(W[:, j:j + 1], scale, bits)[:, 0]
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j + 1:] -= err.unsqueeze(1) * Hinv[j, j + 1:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]  # OBS: remove column j
    return Q[:, torch.argsort(order)]


def planted_layer(seed: int, out=24, inp=64, rows=512, outlier=True):
    """Correlated inputs with (optionally) a few outlier channels, as LLM activations have, and a weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64) / math.sqrt(inp)
    X = torch.randn(rows, inp, generator=g, dtype=torch.float64) @ (torch.eye(inp, dtype=torch.float64) + 2 * mix)
    if outlier:
        X[:, :3] *= torch.tensor([20.0, 8.0, 5.0], dtype=torch.float64)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64) * 0.05
    h = Hessian(inp)
    for chunk in X.split(100):
        h.add(chunk)
    return W, X, h.H


def test_hessian_is_the_mean_of_2_x_xT_over_rows():
    X = torch.randn(300, 7, dtype=torch.float64)
    h = Hessian(7)
    for chunk in X.split(64):  # batches of different sizes weighted by their rows
        h.add(chunk.float())
    assert torch.allclose(h.H, 2 * X.float().double().T @ X.float().double() / 300, atol=1e-10)


@pytest.mark.parametrize("granularity, group, act_order, inp", [
    ("channel", None, False, 64), ("tensor", None, False, 64), ("channel", None, True, 64),
    ("group", 16, False, 64), ("group", 32, True, 64), ("channel", None, False, 300), ("group", 64, False, 300)])
def test_gptq_equals_the_reference_algorithm_in_float64(granularity, group, act_order, inp):
    """The blocked Cholesky form (the reference code's) and the paper's plain column loop with explicit
    inverse-Hessian downdates give the same quantized weight; 300 columns cross the 128-column blocks."""
    W, _, H = planted_layer(1, inp=inp)
    H[5, :] = H[:, 5] = 0  # a dead input: its column must come out 0
    got = gptq_quantize(W, H, 4, granularity=granularity, group_size=group, act_order=act_order)
    want = reference_gptq(W, H, 4, granularity=granularity, group=group, act_order=act_order)
    assert torch.allclose(got, want, atol=1e-10), float((got - want).abs().max())
    assert torch.all(got[:, 5] == 0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits, granularity, group", [(4, "channel", None), (3, "channel", None), (4, "group", 16),
                                                      (4, "tensor", None)])
def test_gptq_output_error_is_never_above_round_to_nearest(seed, bits, granularity, group):
    W, X, H = planted_layer(seed, outlier=seed % 2 == 0)
    err = {}
    for name, Wq in (("gptq", gptq_quantize(W, H, bits, granularity=granularity, group_size=group)),
                     ("rtn", quantize_weight(W, bits, granularity=granularity, group_size=group))):
        err[name] = float(((X @ (Wq - W).T) ** 2).sum())
    assert err["gptq"] <= err["rtn"], err


# ----------------------------------------------------------------------------- grids by hand


def test_group_scales_by_hand():
    """4 bits (grid -8..7, scale max|w|/7) on groups of 2 columns: each row's two groups get their own scale."""
    w = torch.tensor([[0.7, -0.35, 7.0, 1.0], [0.1, 0.2, -1.4, 0.69]])
    want = torch.tensor([[0.7, -0.4, 7.0, 1.0],  # scales 0.1 | 1.0 in row 0
                         [0.1, 0.2, -1.4, 0.6]])  # 0.2/7 | 0.2 in row 1 (0.69 / 0.2 = 3.45 -> 3)
    want[1, 0] = round(0.1 / (0.2 / 7)) * (0.2 / 7)
    assert torch.allclose(quantize_weight(w, 4, granularity="group", group_size=2), want, atol=1e-6)
    # an uneven last group: 3 columns in groups of 2 -> the last column is its own group, exact
    w3 = torch.tensor([[1.0, 0.3, -5.0]])
    got = quantize_weight(w3, 4, granularity="group", group_size=2)
    assert float(got[0, 2]) == -5.0 and float(got[0, 1]) == pytest.approx(round(0.3 * 7) / 7)


def test_kv_cache_grid_by_hand():
    """Per vector asymmetric min-max: [-1, 0, 0.5, 2] at 2 bits -> scale 3/3 = 1, zero round(1) = 1,
    levels -1, 0, 1, 2: 0.5 rounds to 0 (half to even)."""
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [3.0, 3.0, 3.0, 3.0]])
    got = quantize_per_vector(x, 2)
    assert torch.equal(got[0], torch.tensor([-1.0, 0.0, 0.0, 2.0]))
    assert torch.equal(got[1], x[1])  # a constant vector is exact
    y = torch.randn(2, 3, 5, 16)
    err = (quantize_per_vector(y, 4) - y).abs()
    step = (y.amax(-1, keepdim=True) - y.amin(-1, keepdim=True)) / 15
    assert torch.all(err <= step / 2 + 1e-6)  # within half a step of its own vector's grid


# ----------------------------------------------------------------------------- the transforms


def test_hadamard_orders_and_a_planted_massive_activation_spreads():
    for n in (2, 8, 12, 48, 128, 768):
        H = hadamard(n)
        assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64)) and set(H.unique().tolist()) == {-1, 1}
    assert hadamard(100) is None
    Q, kind = rotation_matrix(128, seed=3)
    assert kind == "randomised Hadamard" and torch.allclose(Q @ Q.T, torch.eye(128, dtype=torch.float64))
    x = torch.zeros(128, dtype=torch.float64)
    x[17] = 1000.0  # one massive channel
    y = x @ Q
    # every entry of a normalised Hadamard row has |entry| = 1/sqrt(n): the massive value is spread evenly,
    # and the inf-norm falls by sqrt(n)
    assert torch.allclose(y.abs(), torch.full_like(y, 1000.0 / math.sqrt(128)), rtol=1e-12)
    x[:17] = torch.linspace(-1, 1, 17, dtype=torch.float64)  # with small values beside it, nearly so
    assert float(x.abs().max() / (x @ Q).abs().max()) == pytest.approx(math.sqrt(128), rel=0.02)
    Q2, kind2 = rotation_matrix(100, seed=3)
    assert kind2 == "random orthogonal" and torch.allclose(Q2.T @ Q2, torch.eye(100, dtype=torch.float64))


def sharp(variant: str, bias: bool, dtype=torch.float64, seed=0) -> GPT:
    """A tiny model of `variant` with weights moved off their init (LayerNorm gains and biases included)."""
    torch.manual_seed(seed)
    kw = {"gate_mode": "headwise"} if variant == "outgate" and bias else {}
    m = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, attention=variant,
                      bias=bias, **kw)).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [False, True])
def test_transforms_keep_the_float_logits(variant, bias):
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = sharp(variant, bias, dtype)
        with torch.no_grad():
            ref = model(x)[0]
            rot = copy.deepcopy(model)
            rotate_residual(rot)
            sm = copy.deepcopy(model)
            smooth(sm, [x], 0.5)
            assert float((rot(x)[0] - ref).abs().max()) < tol, (dtype, "rot")
            assert float((sm(x)[0] - ref).abs().max()) < tol, (dtype, "smooth")
        assert rot.lm_head.weight is not rot.transformer.wte.weight  # untied by the rotation
        assert model.lm_head.weight is model.transformer.wte.weight  # the original untouched


def test_rotation_spreads_a_planted_massive_channel_of_the_residual_stream():
    """A position-embedding channel 50x the others (a massive activation in the stream): after the rotation
    the embedding sum's inf-norm falls by about sqrt(C) = 4 (exactly sqrt(C) for one lone entry)."""
    model = sharp("softmax", False, torch.float64)
    with torch.no_grad():
        model.transformer.wpe.weight[:, 3] = 50.0
    x = torch.randint(0, 40, (2, 16))
    seen = {}
    for name, m in (("fp", model), ("rot", copy.deepcopy(model))):
        if name == "rot":
            rotate_residual(m)
        m.tap_embeddings.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, out))
        with torch.no_grad():
            m(x)
    ratio = float(seen["fp"].abs().max() / seen["rot"].abs().max())
    assert 2.5 < ratio <= 4.0 + 1e-9, ratio


def test_smoothquant_moves_an_activation_outlier_into_the_weights():
    """With a planted outlier channel in ln_1's output, SmoothQuant's scale for it is large: the smoothed
    activation range falls, and the readers' column grows by the same factor."""
    model = sharp("softmax", False, torch.float64)
    with torch.no_grad():
        model.transformer.h[0].ln_1.weight[7] = 40.0
    x = [torch.randint(0, 40, (4, 16))]
    before = model.transformer.h[0].attn.c_attn.weight.detach()[:, 7].abs().max()
    sm = copy.deepcopy(model)
    scales = smooth(sm, x, 0.5)
    s = scales["h.0.ln_1"]
    assert int(s.argmax()) == 7
    after = sm.transformer.h[0].attn.c_attn.weight.detach()[:, 7].abs().max()
    assert float(after / before) == pytest.approx(float(s[7]), rel=1e-9)
    assert float(sm.transformer.h[0].ln_1.weight.detach()[7]) == pytest.approx(40.0 / float(s[7]), rel=1e-9)


# ----------------------------------------------------------------------------- the pipeline


def tokens(n: int, b: int = 4, seed: int = 0, T: int = 16, V: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (b, T), generator=g) for _ in range(n)]


@pytest.mark.parametrize("spec", ["w4a16-gptq", "w4a8-g8-gptq-ao", "w4a8-gptq-rot-e8", "w8a8-smooth-kv4",
                                  "w8a8-qkv", "w4a8-rot"])
@pytest.mark.parametrize("variant", ["softmax", "gated", "outgate", "kvbias"])
def test_every_method_runs_on_every_kind_of_block_and_leaves_the_model(spec, variant):
    model = sharp(variant, True, torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens(1, seed=7)[0]
    with torch.no_grad():
        ref = model(x)[0]
        with quantized(model, parse_quant(spec), tokens(2)) as st:
            got = st.model(x)[0]
    assert torch.isfinite(got).all() and 0 < float((got - ref).abs().max()) < 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cfg = st.config
    blocks = [w for w in st.weights if w.startswith("transformer.h.")]
    assert len(blocks) == 2 * (4 + (variant in ("gated", "outgate")))  # every block matmul and gate
    assert ("lm_head.weight" in st.weights) == cfg.head and (cfg.kv_bits is None or "h.1.kv_cache" in st.groups[
        "act.h1.attn"])


def test_a_16_bit_grid_after_the_transforms_is_the_float_model():
    """w16a16 with GPTQ, the rotation or SmoothQuant changes the perplexity by < 1e-3: the transforms keep the
    function and the methods only round."""
    model = sharp("softmax1", False, torch.float32)
    rng = np.random.default_rng(0)
    ds = types.SimpleNamespace(train=rng.integers(0, 40, 3000), val=rng.integers(0, 40, 800), vocab_size=40)
    m = measure(model, ds, quant=["w16a16-gptq-rot", "w16a16-smooth", "w16a16-g4"], n_sequences=2, calib_batches=2)
    for q in ("w16a16-gptq-rot", "w16a16-smooth", "w16a16-g4"):
        assert m.perplexity[q] == pytest.approx(m.perplexity["fp"], rel=1e-3), q
        assert m.kl[q] < 1e-4 and m.top1_agreement[q] > 0.99


def test_kl_and_top1_agreement_against_a_float64_computation():
    model = sharp("softmax", False, torch.float32)
    rng = np.random.default_rng(2)
    ds = types.SimpleNamespace(train=rng.integers(0, 40, 3000), val=rng.integers(0, 40, 500), vocab_size=40)
    m = measure(model, ds, quant=["w3a4"], n_sequences=2, calib_batches=2, batch_size=4)
    from quietgpt.measurement.perplexity import calibration_batches

    calib = calibration_batches(ds.train, 2, 8, 16, 0, "cpu")
    windows = eval_windows(len(ds.val), 16)
    kl = same = n = 0.0
    with quantized(model, parse_quant("w3a4"), calib) as st, torch.no_grad():
        for s, length in windows:
            x = torch.from_numpy(ds.val[s:s + length].astype(np.int64))[None]
            p = torch.log_softmax(model(x)[0].double(), -1)[0]
            q = torch.log_softmax(st.model(x)[0].double(), -1)[0]
            kl += float((p.exp() * (p - q)).sum())
            same += float((p.argmax(-1) == q.argmax(-1)).sum())
            n += length
    assert m.kl["w3a4"] == pytest.approx(kl / n, rel=1e-4) and m.kl["w3a4"] > 1e-3
    assert m.top1_agreement["w3a4"] == pytest.approx(same / n, abs=1.5 / n)


def test_groups_cover_every_quantization_point():
    """quant_groups names every weight and activation quantizer of the full configuration exactly once."""
    model = sharp("gated", True, torch.float32)
    with quantized(model, parse_quant("w4a8-qkv"), tokens(1)) as st:
        owned = [p for g in quant_groups(model) for p in st.groups[g]]
    assert sorted(owned) == sorted(st.weights + list(st.act)) and len(owned) == len(set(owned))
