"""The fixes beyond the normaliser (nn/norms.py, nn/diff.py, model.block = "op", OSP's projections, config.RECIPES,
the pytorch-optimizer wiring): each against an independent computation (float64 formulas written out here, the
Differential Transformer reference's own tensor layout, the library driven by hand), fast == reference, the
paired design kept (shared weights identical across recipes at a seed), and what cannot be done refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quietgpt import GPT, GPTConfig
from quietgpt.config import RECIPES, load_config
from quietgpt.errors import ConfigError, QuietError
from quietgpt.nn.attention import attention
from quietgpt.nn.diff import diff_fast, diff_lambda, diff_reference, lambda_init
from quietgpt.nn.norms import QKNorm, SingleScaleRMSNorm, make_norm
from quietgpt.quant.simulated import quantized
from quietgpt.quant.spec import parse_quant
from quietgpt.study.spec import resolve_spec
from quietgpt.training.optim import build_optimizer, muon_params

F64 = torch.float64


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{"block_size": 16, "vocab_size": 40, "n_layer": 2, "n_head": 2, "n_embd": 16, **kw})


def moved(model: GPT, scale: float = 0.1, seed: int = 1) -> GPT:
    """`model` with every parameter moved off its init (so a gain, projection or lambda that is ignored shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


@pytest.fixture
def float64():
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- norms


def test_ssnorm_is_rmsnorm_with_one_scalar_gain():
    x = torch.randn(3, 5, 8, dtype=F64) * 4 + 1
    ss = SingleScaleRMSNorm().double()
    with torch.no_grad():
        ss.weight.fill_(1.7)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * 1.7
    assert torch.allclose(ss(x), expected, atol=1e-13)
    assert [p.shape for p in ss.parameters()] == [torch.Size([])]  # one scalar, no bias
    rms = make_norm("rmsnorm", 8, bias=True).double()
    with torch.no_grad():
        rms.weight.fill_(1.7)
    assert torch.allclose(rms(x), ss(x), atol=1e-13)  # rmsnorm with every gain equal is ssnorm


def test_qk_norm_matches_he_et_als_formula():
    """x / (rms(x) + eps) * g: eps added to the RMS, not inside the root (their RMSNorm), g per head dim."""
    x = torch.randn(2, 3, 7, 8, dtype=F64) * 0.01  # small rows: eps placement matters
    n = QKNorm(8).double()
    with torch.no_grad():
        n.weight.copy_(torch.linspace(0.5, 1.5, 8, dtype=F64))
    rms = torch.sqrt((x * x).mean(-1, keepdim=True))
    assert torch.allclose(n(x), x / (rms + 1e-5) * n.weight, atol=1e-13)
    assert not torch.allclose(n(x), x / torch.sqrt(rms * rms + 1e-5) * n.weight, atol=1e-6)


def test_every_norm_of_the_model_follows_model_norm():
    for kind, cls in (("layernorm", torch.nn.LayerNorm), ("rmsnorm", torch.nn.RMSNorm), ("ssnorm", SingleScaleRMSNorm)):
        m = GPT(tiny(norm=kind))
        norms = [m.transformer.ln_f] + [b.ln_1 for b in m.transformer.h] + [b.ln_2 for b in m.transformer.h]
        assert all(type(n) is cls for n in norms), kind


# ----------------------------------------------------------------------------- the outlier-protected block


def test_op_block_matches_a_float64_forward_written_out(float64):
    """He et al.'s block written out from the weights: no pre-norm on the branches (ln_1 only in block 0),
    QK-norm on q and k, softmax attention, each branch added times 0.2; ln_f kept."""
    torch.manual_seed(0)
    model = moved(GPT(tiny(block="op", bias=True)), seed=2).eval()
    idx = torch.randint(0, 40, (2, 16))
    T, H, C = 16, 2, 16
    x = model.transformer.wte.weight[idx] + model.transformer.wpe.weight[:T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for i, block in enumerate(model.transformer.h):
        a = block.attn
        h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias) if i == 0 else x
        q, k, v = (h @ a.c_attn.weight.T + a.c_attn.bias).split(C, dim=2)
        q, k, v = (t.view(2, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        g = a.qk_norm.weight
        q = q / (q.pow(2).mean(-1, keepdim=True).sqrt() + 1e-5) * g
        k = k / (k.pow(2).mean(-1, keepdim=True).sqrt() + 1e-5) * g
        s = (q @ k.transpose(-1, -2) / math.sqrt(C // H)).masked_fill(future, float("-inf"))
        y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(2, T, C)
        x = x + 0.2 * (y @ a.c_proj.weight.T + a.c_proj.bias)
        m = block.mlp
        x = x + 0.2 * (F.gelu(x @ m.c_fc.weight.T + m.c_fc.bias) @ m.c_proj.weight.T + m.c_proj.bias)
    ln = model.transformer.ln_f
    logits = F.layer_norm(x, (C,), ln.weight, ln.bias) @ model.lm_head.weight.T
    assert torch.allclose(model(idx, idx)[0], logits, atol=1e-12)
    assert isinstance(model.transformer.h[1].ln_1, torch.nn.Identity)
    assert isinstance(model.transformer.h[0].ln_2, torch.nn.Identity)


def test_the_prenorm_block_is_unchanged_bit_for_bit():
    """block = prenorm (the default) computes exactly what GPT-2's block did: x + attn(ln_1(x)), no gain."""
    torch.manual_seed(0)
    model = moved(GPT(tiny()))
    idx = torch.randint(0, 40, (2, 16))
    block = model.transformer.h[0]
    x = torch.randn(2, 16, 16)
    mid = x + block.attn(block.ln_1(x))
    assert torch.equal(block(x), mid + block.mlp(block.ln_2(mid)))
    assert block.attn.qk_norm is None and model(idx)[0].isfinite().all()


# ----------------------------------------------------------------------------- OSP's projections, the paired design


def test_embedding_projections_start_as_the_identity_and_change_nothing_at_init():
    torch.manual_seed(0)
    plain = GPT(tiny())
    torch.manual_seed(0)
    osp = GPT(tiny(embed_proj=True))
    assert torch.equal(osp.emb_proj.weight, torch.eye(16)) and torch.equal(osp.head_proj.weight, torch.eye(16))
    idx = torch.randint(0, 40, (2, 16))
    assert torch.equal(plain(idx)[0], osp(idx)[0])


@pytest.mark.parametrize("settings", [{"norm": "rmsnorm"}, {"norm": "ssnorm", "embed_proj": True}, {"block": "op"},
                                      {"attention": "diff"}])
def test_shared_weights_are_the_baselines_at_a_seed(settings):
    """Every matmul and embedding a recipe shares with the baseline is drawn identically (the paired design):
    a recipe's own parameters are drawn after them, or draw nothing."""
    torch.manual_seed(5)
    base = dict(GPT(tiny()).named_parameters())
    torch.manual_seed(5)
    other = dict(GPT(tiny(**settings)).named_parameters())
    shared = [n for n in base if n in other and base[n].dim() >= 2]
    assert len(shared) >= 2 + 4 * 2
    for n in shared:
        assert torch.equal(base[n], other[n]), n


def test_the_projections_fold_into_the_quantized_embedding_and_head():
    """Quantization folds E into an untied wte and P into lm_head (logits unchanged in float), then quantizes
    them as the embedding and head; SmoothQuant and the rotation are refused for other norms and the op block."""
    torch.manual_seed(0)
    model = moved(GPT(tiny(embed_proj=True, norm="ssnorm")))
    idx = torch.randint(0, 40, (2, 16))
    with quantized(model, parse_quant("w16a16-e16"), [idx]) as q:
        assert q.model.emb_proj is None and q.model.lm_head.weight is not q.model.transformer.wte.weight
        assert torch.allclose(q.model(idx)[0], model(idx)[0], atol=2e-3)
        assert set(q.groups["wte/head"]) == {"lm_head.weight", "transformer.wte.weight"}
    assert model.emb_proj is not None  # the caller's model is untouched
    for spec, settings in (("w8a8-smooth", {"norm": "ssnorm"}), ("w4a8-pc-gptq-rot-e8", {"block": "op"}),
                           ("w4a8-pc-gptq-rot-e8", {"norm": "rmsnorm"})):
        with pytest.raises(QuietError, match="derived for the pre-norm LayerNorm block"):
            with quantized(GPT(tiny(**settings)), parse_quant(spec), [idx]):
                pass


# ----------------------------------------------------------------------------- differential attention


def ye_et_al(q, k, v, lam, init, gain):
    """microsoft/unilm Diff-Transformer multihead_diffattn.py's forward from the head projections on, in its own
    layout: queries/keys as 2H heads of head_dim / 2 (view(B, T, 2H, d)), values as H heads of 2d, the two maps
    per head, RMSNorm(eps 1e-5) with a gain, times (1 - lambda_init). q, k, v (B, T, H * D) float64."""
    B, T, C = q.shape
    n_heads, d = C // gain.numel(), gain.numel() // 2  # gain: (2d,), one per value channel of a head
    qh = q.view(B, T, 2 * n_heads, d).transpose(1, 2)
    kh = k.view(B, T, 2 * n_heads, d).transpose(1, 2)
    vh = v.view(B, T, n_heads, 2 * d).transpose(1, 2)
    w = (qh * d ** -0.5) @ kh.transpose(-1, -2)
    w = w.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    w = w.view(B, n_heads, 2, T, T)
    w = w[:, :, 0] - lam * w[:, :, 1]
    out = w @ vh
    out = out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * gain
    return (out * (1 - init)).transpose(1, 2).reshape(B, T, C)


def test_diff_attention_is_the_reference_implementations(float64):
    torch.manual_seed(0)
    model = moved(GPT(tiny(attention="diff")), seed=3)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 16, 16)
    q, k, v = attn.c_attn(x).split(16, dim=2)
    d = attn.core.diff
    lam = torch.exp((d.lq1 * d.lk1).sum()) - torch.exp((d.lq2 * d.lk2).sum()) + lambda_init(1)
    expected = ye_et_al(q, k, v, lam, lambda_init(1), d.subln.weight)
    split = [t.view(2, 16, 2, 8).transpose(1, 2) for t in (q, k, v)]
    got = attn.core(*split).transpose(1, 2).reshape(2, 16, 16)
    assert torch.allclose(got, expected, atol=1e-12)
    assert lambda_init(0) == pytest.approx(0.2) and lambda_init(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("T", [1, 13, 40])
def test_diff_fast_equals_reference_values_and_grads(float64, per_row, T):
    """Two SDPA calls on zero-padded halves == the materialised A1 - lambda A2, in values and in the gradients
    of q, k, v and the four lambda vectors; lambda one per layer or one per batch row (an ensemble's)."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(3, 2, T, 8, generator=g, requires_grad=True) for _ in range(3))
    vecs = [torch.randn((3, 4) if per_row else (4,), generator=g).mul(0.3).requires_grad_() for _ in range(4)]

    def run(fn):
        out = fn(q, k, v, diff_lambda(*vecs, init=0.35))
        return out, torch.autograd.grad((out * torch.cos(out)).sum(), [q, k, v, *vecs])

    (a, ga), (b, gb) = run(diff_fast), run(diff_reference)
    assert torch.allclose(a, b, atol=1e-12)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, atol=1e-11)


def test_diff_rows_sum_to_one_minus_lambda_and_the_tap_sees_them(float64):
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    seen = []
    attention(q, k, v, "diff", diff_lambda=torch.tensor(0.3), probs_hook=lambda p: seen.append(p) or p)
    assert torch.allclose(seen[0].sum(-1), torch.full((1, 2, 9), 0.7), atol=1e-12)
    with pytest.raises(ConfigError, match="diff_lambda"):
        attention(q, k, v, "diff")
    with pytest.raises(ConfigError, match="even"):
        attention(q[..., :7], k[..., :7], v, "diff", diff_lambda=torch.tensor(0.3))


# ----------------------------------------------------------------------------- ensembles of the recipes


@pytest.mark.parametrize("settings", [{"norm": "rmsnorm"}, {"norm": "ssnorm", "embed_proj": True}, {"block": "op"},
                                      {"attention": "diff"}])
def test_the_ensemble_forward_and_gradients_are_each_members(float64, settings, ensemble_equals_members):
    ensemble_equals_members([moved(GPT(tiny(**settings)), seed=s) for s in range(3)], atol=1e-12)


# ----------------------------------------------------------------------------- optimizers of the library


def test_a_library_optimizer_is_the_library_driven_by_hand():
    """quietgpt's soap step == pytorch_optimizer.SOAP built by hand over the same groups, for 5 steps, with the
    schedule's rate written into each group as training does."""
    import pytorch_optimizer

    torch.manual_seed(0)
    a = moved(GPT(tiny()))
    b = moved(GPT(tiny()))
    b.load_state_dict(a.state_dict())
    tc = load_config("default", {"train.optimizer": "soap", "train.optimizer_args.precondition_frequency": "2"}).train
    ours = build_optimizer(a, tc, "cpu")
    groups = [{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    theirs = pytorch_optimizer.SOAP(groups, lr=tc.learning_rate, precondition_frequency=2)
    idx = torch.randint(0, 40, (4, 17))
    for step in range(5):
        for model, opt in ((a, ours), (b, theirs)):
            for grp in opt.param_groups:
                grp["lr"] = 1e-3 * (step + 1) * grp.get("lr_scale", 1.0)
            model(idx[:, :-1], idx[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lion_takes_its_papers_smaller_rate_and_larger_decay():
    torch.manual_seed(0)
    tc = load_config("default", {"train.optimizer": "lion"}).train
    opt = build_optimizer(GPT(tiny()), tc, "cpu")
    assert type(opt).__name__ == "Lion"
    assert opt.param_groups[0]["lr"] == pytest.approx(tc.learning_rate / 3)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(3 * tc.weight_decay)
    tc = load_config("default", {"train.optimizer": "lion", "train.optimizer_args.lr_scale": "1",
                                 "train.optimizer_args.betas": "[0.95, 0.98]"}).train
    opt = build_optimizer(GPT(tiny()), tc, "cpu")
    assert opt.param_groups[0]["lr"] == pytest.approx(tc.learning_rate)
    assert opt.param_groups[0]["betas"] == (0.95, 0.98)


@pytest.mark.parametrize(("overrides", "words"), [
    ({"train.optimizer": "lion", "train.optimizer_args.bettas": "1"}, "not an option of pytorch_optimizer.Lion"),
    ({"train.optimizer_args.eps": "1e-6"}, "but the optimizer is adamw"),
    ({"train.optimizer": "lib:nosuch"}, "lib:<name> of pytorch-optimizer"),
    ({"train.optimizer": "soap", "train.optimizer_args.lr": "1"}, "lr_scale"),
    ({"train.optimizer": "soap", "train.optimizer_args": "3"}, "table of options"),
    ({"model.norm": "batchnorm"}, "choose one of layernorm, rmsnorm, ssnorm"),
    ({"model.block": "postnorm"}, "choose one of prenorm, op"),
    ({"model.resid_gain": "0.5"}, "set model.block=op"),
])
def test_bad_recipe_settings_are_one_line_errors(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config("default", overrides)
    assert "\n" not in str(e.value)


def test_osps_projections_train_with_muon():
    names = [n for n, _ in muon_params(GPT(tiny(embed_proj=True)))]
    assert "emb_proj.weight" in names and "head_proj.weight" in names
    assert not any("wte" in n or "ln_" in n for n in names)


# ----------------------------------------------------------------------------- studies cross recipes


def test_a_study_puts_recipes_beside_variants():
    spec = resolve_spec("default", variants=["softmax", "osp", "op", "diff"], seeds=2, quant=["w4a8-pc-gptq-e8"])
    cfg = {arm: spec.run_config(arm, 0, "x") for arm in spec.arms}
    assert cfg["osp"].model.attention == "softmax" and cfg["osp"].train.optimizer == "muon"
    assert cfg["osp"].model.norm == "ssnorm" and cfg["osp"].model.embed_proj
    assert cfg["op"].model.block == "op" and cfg["op"].train.optimizer == "adamw"
    assert cfg["diff"].model.attention == "diff" and cfg["softmax"].model == load_config("default").model
    crossed = resolve_spec("default", variants=["softmax", "osp"], optimizers=["adamw", "lion"], seeds=1)
    assert crossed.run_config("osp+lion", 0, "x").train.optimizer == "lion"  # the arm's optimizer wins
    assert all(r["model.attention"] == "softmax" for r in RECIPES.values() if "model.attention" in r)
    with pytest.raises(ConfigError, match="recipes osp"):
        resolve_spec("default", variants=["softmax", "opp"])
    with pytest.raises(QuietError, match=r"model\.block=op"):
        resolve_spec("default", variants=["softmax", "op"], quant=["w8a8-smooth"])
