"""The published fixes as attention variants: softpick (Zuhri et al. 2025), the G1 output gate (Qiu et al.
2025), sigmoid attention (Ramapuram et al. 2024) and the key/value bias (Sun et al. 2024). Each against an
independent formula (float64, hand-computed values, scipy), its fast path against its reference path,
its parameters in the model, its measurement and its study run. (test_attention.py and test_model.py
run them through the checks every variant gets.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.special import expit

from quietgpt import GPT, AttentionOptions, GPTConfig, QuietAttention, attention, select_path
from quietgpt.errors import ConfigError
from quietgpt.measurement.collectors import StatsCollector
from quietgpt.nn import kernels as K
from quietgpt.nn.chunked import chunked_attention
from quietgpt.nn.gates import OutputGate
from quietgpt.nn.softmax import sigmoid_bias, sigmoid_weights, softpick
from quietgpt.quant.simulated import quantized
from quietgpt.quant.spec import parse_quant


def qkv(B=2, H=3, T=37, D=16, dtype=torch.float64, seed=0, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, T, D, generator=g, dtype=dtype) * spread).requires_grad_() for _ in range(3)]


def tiny(**kw) -> GPTConfig:
    base = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, bias=False)
    return GPTConfig(**{**base, **kw})


def softpick_definition(x: torch.Tensor, eps: float = 1e-8, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's formula as written, unshifted, in float64 (fine for moderate x), over the entries
    `seen` (a boolean mask; default all)."""
    e = torch.exp(x.double()) - 1
    seen = torch.ones_like(e, dtype=torch.bool) if seen is None else seen
    return torch.relu(e) * seen / ((e.abs() * seen).sum(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------- the formulas


def test_softpick_hand_computed_values():
    # exp(x) - 1 = [2, -0.5] for x = [log 3, log 0.5]: weights [2 / 2.5, 0]; a fifth of the row is unassigned
    w = softpick(torch.tensor([math.log(3.0), math.log(0.5)], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([0.8, 0.0], dtype=torch.float64), atol=1e-8)
    assert w[1] == 0.0  # exactly: every x <= 0 gets an exact zero
    # [0, log 2]: exp - 1 = [0, 1]; eps = 1e-8 in the formula's own units
    w = softpick(torch.tensor([0.0, math.log(2.0)], dtype=torch.float64))
    assert w[0] == 0.0 and w[1] == pytest.approx(1 / (1 + 1e-8), abs=1e-15)
    # a row with nothing above 0 abstains completely
    assert torch.equal(softpick(torch.tensor([-1.0, -0.5, 0.0])), torch.zeros(3))


def test_softpick_matches_the_definition_and_is_stable():
    torch.manual_seed(0)
    x = torch.randn(5, 40) * 4
    got = softpick(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), softpick_definition(x), atol=1e-6)
    # shifting by max(max, 0): huge rows do not overflow, hugely negative ones are all zeros
    big = torch.tensor([[1000.0, 999.0, -5.0], [-1000.0, -2000.0, -3000.0]])
    w = softpick(big)
    assert torch.isfinite(w).all() and torch.equal(w[1], torch.zeros(3))
    r = math.exp(-1.0)  # row 0: e^1000 - 1 and e^999 - 1 dominate the |.|-sum: [1, e^-1, 0] / (1 + e^-1)
    assert torch.allclose(w[0], torch.tensor([1 / (1 + r), r / (1 + r), 0.0]), atol=1e-6)
    # masked keys (-inf) get 0 and add nothing to the denominator: the same as leaving them out
    y = torch.randn(4, 9, dtype=torch.float64)
    masked = torch.cat([y, torch.full((4, 3), -math.inf, dtype=torch.float64)], -1)
    assert torch.allclose(softpick(masked)[:, :9], softpick_definition(y), atol=1e-14)
    assert torch.equal(softpick(masked)[:, 9:], torch.zeros(4, 3, dtype=torch.float64))
    assert torch.equal(softpick(torch.full((2, 5), -math.inf)), torch.zeros(2, 5))  # no NaN
    # any dim, and fp16 in / fp16 out
    z = torch.randn(3, 6, 4)
    assert torch.allclose(softpick(z, dim=1), softpick(z.transpose(1, 2)).transpose(1, 2))
    assert softpick(z.half()).dtype == torch.float16


def test_softpick_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert (x.abs() > 1e-3).all()  # away from the ReLU's kink
    assert torch.autograd.gradcheck(softpick, (x,))


def test_sigmoid_weights_and_auto_bias():
    assert sigmoid_bias(1024) == pytest.approx(-math.log(1024)) and sigmoid_bias(7, -2.5) == -2.5
    x = torch.randn(4, 10)
    x[:, 7:] = -math.inf
    w = sigmoid_weights(x, sigmoid_bias(10))
    ref = expit(x.numpy().astype("float64") - math.log(10))  # scipy's logistic function
    assert torch.allclose(w.double(), torch.from_numpy(ref), atol=1e-7)
    assert torch.equal(w[:, 7:], torch.zeros(4, 3))
    # no row normalisation: large scores give a row sum above 1
    assert sigmoid_weights(torch.full((1, 10), 10.0), -math.log(10)).sum() > 9


# ----------------------------------------------------------------------------- the fast paths


@pytest.mark.parametrize("kind", ["softpick", "sigmoid"])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_blocks_do_not_change_the_result(kind, causal):
    """However the queries are blocked (1, 5, 16 or all at once), values and gradients are the same, causal
    or not, and equal the independent float64 formula."""
    q, k, v = qkv(T=23, seed=3)
    T, D = 23, 16
    seen = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    p = torch.sigmoid(s - math.log(T)) * seen if kind == "sigmoid" else softpick_definition(s, seen=seen)
    ref = p @ v
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v), g)
    b = -math.log(T) if kind == "sigmoid" else 1e-8
    for block in (1, 5, 16, 128):
        out = chunked_attention(kind, q, k, v, b, causal, 1 / math.sqrt(D), block=block)
        assert torch.allclose(out, ref, atol=1e-12), block
        for a, w in zip(torch.autograd.grad(out, (q, k, v), g), want):
            assert torch.allclose(a, w, atol=1e-11), block


@pytest.mark.parametrize("variant", ["softpick", "sigmoid"])
def test_chunked_path_keeps_o_of_t_for_backward(variant):
    """Autograd keeps q, k and v (and softpick its output, for rho), as SDPA keeps q, k, v, its output
    and LSE, so what the backward holds doubles with T; the reference path keeps T x T weights."""
    def saved_mb(T, path):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        q, k, v = qkv(B=1, H=2, T=T, D=16, dtype=torch.float32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attention(q, k, v, variant, path=path).sum().backward()
        return total

    assert saved_mb(512, "auto") == (4 if variant == "softpick" else 3) * 2 * 512 * 16 * 4  # q, k, v (, out)
    assert saved_mb(1024, "auto") == 2 * saved_mb(512, "auto")
    assert saved_mb(1024, "reference") > 3.5 * saved_mb(512, "reference")


def test_kvbias_zero_bias_is_softmax1():
    """k' = 0 and v' = 0: the bias key's logit is q.0 = 0 and its value adds nothing, which is softmax1."""
    q, k, v = qkv()
    zero = (torch.zeros(3, 16, dtype=torch.float64), torch.zeros(3, 16, dtype=torch.float64))
    want = attention(q, k, v, "softmax1", path="reference")
    for path in ("auto", "reference"):
        assert torch.allclose(attention(q, k, v, "kvbias", kv_bias=zero, path=path), want, atol=1e-12), path
    seen = {}
    for variant, kw in (("kvbias", {"kv_bias": zero}), ("softmax1", {})):
        attention(q, k, v, variant, probs_hook=lambda p, variant=variant: seen.setdefault(variant, p), **kw)
    assert torch.allclose(seen["kvbias"], seen["softmax1"], atol=1e-14)


def test_kvbias_prefix_path_exact():
    """The SDPA-over-[k'; keys] path (dropout on, or no LSE kernel) equals the float64 formula."""
    q, k, v = qkv()
    k_b, v_b = (torch.randn(3, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = K._kv_prefix_attention(q, k, v, k_b, v_b, True, 1 / 4, 0.0)
    ref = attention(q, k, v, "kvbias", kv_bias=(k_b, v_b), path="reference")
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, k_b, v_b), g), torch.autograd.grad(ref, (q, k, v, k_b, v_b), g)):
        assert torch.allclose(a, b, atol=1e-11)


def test_probs_tap_sees_each_variants_weights():
    """Measurement reads the reference weights through the tap: softpick's have exact zeros and rows <= 1,
    sigmoid's rows can exceed 1 (negative "unassigned mass"), kvbias's rows miss exactly the weight on k'."""
    q, k, v = qkv(B=1, H=2, T=12, D=8, dtype=torch.float32, spread=2.0)
    got = {}
    for variant in ("softpick", "sigmoid", "kvbias"):
        core = QuietAttention(2, AttentionOptions(variant=variant), head_dim=8)
        if variant == "kvbias":
            with torch.no_grad():
                core.k_bias.copy_(torch.randn(2, 8, generator=torch.Generator().manual_seed(4)) * 2)
        core.tap_probs.register_forward_hook(lambda m, i, o, variant=variant: got.setdefault(variant, o))
        core(q, k, v)
        assert core.last_path == "reference" and got[variant].shape == (1, 2, 12, 12)
    upper = torch.ones(12, 12, dtype=torch.bool).triu(1)
    sp = got["softpick"]
    assert (sp[..., upper] == 0).all() and (sp.sum(-1) <= 1 + 1e-6).all()
    assert ((sp == 0) & ~upper).sum() > 0  # visible keys with exactly zero weight
    assert (got["sigmoid"].sum(-1) > 1).any()
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)).masked_fill(upper, -math.inf)
    s_b = q.double() @ core.k_bias.double().unsqueeze(-1) / math.sqrt(8)  # (1, 2, 12, 1)
    p_bias = torch.softmax(torch.cat([s_b, s], -1), -1)[..., 0]
    assert torch.allclose(1 - got["kvbias"].double().sum(-1), p_bias, atol=1e-6)


def test_new_variant_misuse_is_a_one_line_error():
    q, k, v = qkv()
    bias = (torch.zeros(3, 16), torch.zeros(3, 16))
    for call, match in [
        (lambda: attention(q, k, v, "kvbias"), "kv_bias .* is for attention variant 'kvbias' and it needs one"),
        (lambda: attention(q, k, v, "softmax1", kv_bias=bias), "got variant 'softmax1' with kv_bias=given"),
        (lambda: QuietAttention(3, AttentionOptions(variant="kvbias")), "needs head_dim"),
        (lambda: attention(q, k, v, "softpick", sigmoid_bias=-1.0), "belongs to variant 'sigmoid'"),
        (lambda: attention(q, k, v, "softpick", path="fast", dropout_p=0.1), "no attention dropout"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    assert select_path("softpick", "auto", q, dropout_p=0.1) == "reference"


# ----------------------------------------------------------------------------- in the model


def test_output_gate_modes_start_at_one_half():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for mode, shape in (("elementwise", (2, 2, 5, 8)), ("headwise", (2, 2, 5, 1)), ("constant", (1, 2, 1, 1))):
        model = GPT(tiny(attention="outgate", gate_mode=mode))
        gate = model.transformer.h[0].attn.gate
        assert isinstance(gate, OutputGate) and gate.mode == mode
        g = gate(x)
        assert g.shape == shape
        # sigmoid(~0): weights N(0, 0.02) on a unit-variance x of 16 features give logits of std ~0.08; bias 0
        assert torch.allclose(g, torch.full_like(g, 0.5), atol=0.1) and abs(g.mean().item() - 0.5) < 0.01
    # unlike Bondarenko's per-head gate, each head's G1 gate reads all of x: changing head 1's slice moves head 0's
    gate = GPT(tiny(attention="outgate")).transformer.h[0].attn.gate
    x2 = x.clone()
    x2[..., 8:] += 5.0
    assert not torch.allclose(gate(x2)[:, 0], gate(x)[:, 0])


@pytest.mark.parametrize("mode", ["elementwise", "headwise"])
def test_output_gate_multiplies_each_heads_output_before_c_proj(mode):
    """The attention sub-block recomputed by hand: Y' = SDPA(q, k, v) * sigmoid(x W_g + b_g) per head, then
    the heads side by side, then c_proj (Qiu et al.'s G1 position)."""
    torch.manual_seed(1)
    attn = GPT(tiny(attention="outgate", gate_mode=mode, bias=True)).transformer.h[0].attn
    with torch.no_grad():
        attn.gate.weight.normal_(std=0.5)
        attn.gate.bias.normal_(std=0.5)
    x = torch.randn(2, 7, 16)
    q, k, v = (t.view(2, 7, 2, 8).transpose(1, 2) for t in attn.c_attn(x).split(16, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
    gate = torch.sigmoid(x @ attn.gate.weight.T + attn.gate.bias).view(2, 7, 2, -1).transpose(1, 2)
    want = attn.c_proj((y * gate).transpose(1, 2).reshape(2, 7, 16))
    assert torch.allclose(attn(x), want, atol=1e-6)


def test_constant_gate_scales_the_paired_softmax_model_by_one_half():
    """At a seed, outgate-constant has softmax's shared weights and a gate of exactly sigmoid(0) = 1/2 on
    every head, so its first block's attention output is half of softmax's."""
    outs = {}
    for variant, extra in (("softmax", {}), ("outgate", {"gate_mode": "constant"})):
        torch.manual_seed(5)
        model = GPT(tiny(attention=variant, **extra))
        with model.observe(lambda s, layer, t, v=variant: outs.setdefault(v, t) if layer == 0 else None,
                           sites=("attn_out",)):
            model(torch.arange(16).view(1, 16) % 37)
    assert torch.allclose(outs["outgate"], 0.5 * outs["softmax"], atol=1e-7)


def test_kvbias_parameters_are_initialised_last():
    torch.manual_seed(0)
    model = GPT(tiny(attention="kvbias", n_embd=128, n_head=4))
    core = model.transformer.h[0].attn.core
    assert core.k_bias.shape == core.v_bias.shape == (4, 32)
    assert abs(core.k_bias.std().item() - 0.02) < 0.004 and abs(core.v_bias.std().item() - 0.02) < 0.004
    torch.manual_seed(0)
    softmax = GPT(tiny(attention="softmax", n_embd=128, n_head=4)).state_dict()
    for key, t in model.state_dict().items():
        if key in softmax:
            assert torch.equal(t, softmax[key]), key
    decay, _ = model.param_groups(0.1)
    assert any(p is core.k_bias for p in decay["params"])  # (H, D): decayed, as in Sun et al.'s nanoGPT code


def test_outgate_is_quantized_like_a_linear_layer():
    """The input-dependent G1 gate's weight, input and gate values are quantized (as HeadGate's are); the
    constant gate has no input and stays in high precision like a bias."""
    calib = [torch.randint(0, 37, (2, 16))]
    for mode, quantizes in (("elementwise", True), ("constant", False)):
        torch.manual_seed(0)
        model = GPT(tiny(attention="outgate", gate_mode=mode))
        w = model.transformer.h[0].attn.gate.weight
        before = None if w is None else w.detach().clone()
        with quantized(model, parse_quant("w4a8"), calib) as state:
            names = set(state.act)
            if quantizes:
                assert not torch.equal(state.model.transformer.h[0].attn.gate.weight, before)
        assert ({"transformer.h.0.attn.gate.in", "transformer.h.0.attn.gate.out"} <= names) == quantizes
        assert ("transformer.h.0.attn.gate.weight" in state.weights) == quantizes
        if before is not None:
            assert torch.equal(model.transformer.h[0].attn.gate.weight, before)  # the model itself untouched


def test_collected_unassigned_mass_is_the_weight_on_the_bias_key():
    """StatsCollector's unassigned mass for kvbias is the mean weight on k', computed here from scratch."""
    torch.manual_seed(0)
    model = GPT(tiny(attention="kvbias")).eval()
    core = model.transformer.h[0].attn.core
    with torch.no_grad():
        core.k_bias.normal_(std=2.0)
    idx = torch.randint(0, 37, (3, 16))
    collector = StatsCollector()
    with torch.no_grad(), model.observe(collector, sites=("attn_probs",)):
        model(idx)
    rows = {(r["layer"], r["head"]): r["unassigned_mass"] for r in collector.attention_rows()}
    with torch.no_grad():
        block = model.transformer.h[0]
        x = block.ln_1(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(16)))
        q, k, _ = (t.view(3, 16, 2, 8).transpose(1, 2).double() for t in block.attn.c_attn(x).split(16, 2))
        future = torch.ones(16, 16, dtype=torch.bool).triu(1)
        s = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(future, -math.inf)
        s_b = q @ core.k_bias.double().unsqueeze(-1) / math.sqrt(8)
        p_bias = torch.softmax(torch.cat([s_b, s], -1), -1)[..., 0].mean(dim=(0, 2))  # per head
    for h in range(2):
        assert rows[(0, h)] == pytest.approx(p_bias[h].item(), abs=1e-6)


@pytest.mark.slow
def test_micro_study_with_the_new_variants(tmp_path):
    """`quietgpt study --variants` trains, measures and reports every new variant: all runs ok, a parameter
    count that includes each variant's extras, and an unassigned-mass heatmap for each variant that can
    leave mass unassigned."""
    from quietgpt.cli import main

    tiny_run = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
                "train.batch_size": 4, "train.max_iters": 3, "train.lr_decay_iters": 3, "train.warmup_iters": 1,
                "train.eval_interval": 3, "train.eval_iters": 1, "data.synthetic_tokens": 20000,
                "data.cache_dir": str(tmp_path / "cache"), "train.threads": 1}
    args = [a for key, val in tiny_run.items() for a in ("--set", f"{key}={val}")]
    variants = ["softmax", "softpick", "outgate", "sigmoid", "kvbias"]
    out = tmp_path / "s"
    assert main(["study", "--out", str(out), "--variants", ",".join(variants), "--seeds", "1", "--jobs", "1",
                 "--quant", "w8a8", *args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["runs"]] == ["ok"] * 5, [r.get("error") for r in results["runs"]]
    n_params = {}
    for r in results["runs"]:
        summary = json.loads((out / r["dir"] / "summary.json").read_text())
        cfg = json.loads((out / r["dir"] / "config.json").read_text())["model"]
        n_params[r["variant"]] = summary["n_params"]
        assert summary["n_params"] == GPT(GPTConfig.from_dict(cfg)).num_params()
    C = 32
    assert n_params["kvbias"] - n_params["softmax"] == 2 * C  # k' and v': head_dim per head each
    assert n_params["outgate"] - n_params["softmax"] == C * C  # the elementwise gate, bias=False
    assert n_params["softpick"] == n_params["sigmoid"] == n_params["softmax"]
    zero_share = results["summary"]["attention_zero_share"]  # the registry's metric, a study column
    assert zero_share["softpick"]["mean"] > 0.1 and zero_share["softmax"]["mean"] == 0.0
    assert "attention_zero_share" in (out / "results.csv").read_text().splitlines()[0]
    assert "attention zero share (sparsity)" in (out / "report.md").read_text()
    assert (out / "plots" / "unassigned_mass.png").is_file()  # one figure, the variants that can leave mass
    caption = next(ln for ln in (out / "report.md").read_text().splitlines() if "Unassigned attention mass" in ln)
    assert all(v in caption for v in ("softpick", "sigmoid", "kvbias")) and "outgate" not in caption
    assert (out / "report.html").is_file()
