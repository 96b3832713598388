"""Every attention variant's fast path against its reference path (values and gradients), and the
reference path against an independent float64 formula."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from quietgpt import AttentionOptions, QuietAttention, attention, select_path
from quietgpt.errors import ConfigError
from quietgpt.nn import kernels as K
from quietgpt.nn import variants as V

VARIANTS = ["softmax", "softmax1", "softmax_n", "sink", "clipped", "gated", "softpick", "outgate", "sigmoid",
            "kvbias"]


def naive_rowwise64(q, k, v, kind, causal=True):
    """Independent float64 softpick (the paper's unshifted formula) and sigmoid attention (b = -log T)."""
    q, k, v = q.double(), k.double(), v.double()
    T, D = q.shape[-2], q.shape[-1]
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    seen = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    if kind == "sigmoid":
        p = torch.sigmoid(s - math.log(T)) * seen
    else:
        e = torch.exp(s) - 1
        p = torch.relu(e) * seen / ((e.abs() * seen).sum(-1, keepdim=True) + 1e-8)
    return p @ v


def naive_kvbias64(q, k, v, k_b, v_b):
    """Independent float64 key/value bias: ordinary causal softmax over the keys with k' prepended (seen by
    every query) and the values with v' prepended, as Sun et al.'s code writes it."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    k_aug = torch.cat([k_b.double().view(1, H, 1, D).expand(B, H, 1, D), k], 2)
    v_aug = torch.cat([v_b.double().view(1, H, 1, -1).expand(B, H, 1, v.shape[-1]), v], 2)
    s = q @ k_aug.transpose(-1, -2) / math.sqrt(D)
    seen = torch.cat([torch.ones(T, 1, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    return torch.softmax(s.masked_fill(~seen, float("-inf")), -1) @ v_aug


def naive64(q, k, v, log_null=None, causal=True, clip=None, gate=None):
    """Independent float64 ground truth: scores, an explicit null column with logit log_null
    (per head allowed), softmax, drop the null column."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    if log_null is not None:
        null = torch.as_tensor(log_null, dtype=torch.float64).reshape(-1, 1, 1).expand(H, T, 1)
        s = torch.cat([s, null.expand(B, H, T, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if log_null is not None:
        p = p[..., :-1]
    if clip is not None:
        gamma, zeta = clip
        p = ((zeta - gamma) * p + gamma).clamp(0, 1)
    out = p @ v
    return out * gate.double() if gate is not None else out


def make_qkv(B=2, H=3, T=37, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, T, D, generator=g) * 1.5).to(dtype).requires_grad_() for _ in range(3)]


def kwargs_for(variant, H, dtype=torch.float32):
    kw = {}
    if variant == "softmax_n":
        kw["n"] = 2.5
    if variant == "sink":
        kw["sink_logit"] = torch.linspace(-1.0, 1.5, H, dtype=dtype).requires_grad_()
    if variant == "clipped":
        kw.update(gamma=-0.05, zeta=1.02)
    if variant == "gated":
        kw["gate"] = torch.rand(2, H, 37, 1, dtype=dtype)
    if variant == "outgate":  # elementwise: head_dim gates per head
        kw["gate"] = torch.rand(2, H, 37, 16, dtype=dtype)
    if variant == "kvbias":
        g = torch.Generator().manual_seed(5)
        kw["kv_bias"] = tuple(torch.randn(H, 16, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    return kw


def params_of(variant, kw):
    """The learned tensors besides q, k, v whose gradients the tests compare."""
    return {"sink": [kw.get("sink_logit")], "kvbias": list(kw.get("kv_bias", ()))}.get(variant, [])


def naive_for(variant, q, k, v, kw):
    if variant in ("softpick", "sigmoid"):
        return naive_rowwise64(q, k, v, variant)
    if variant == "kvbias":
        return naive_kvbias64(q, k, v, *kw["kv_bias"])
    log_null = {"softmax1": 0.0, "softmax_n": math.log(2.5)}.get(variant)
    if variant == "sink":
        log_null = kw["sink_logit"]
    clip = (kw["gamma"], kw["zeta"]) if variant == "clipped" else None
    return naive64(q, k, v, log_null=log_null, clip=clip, gate=kw.get("gate"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_matches_float64_formula(variant):
    q, k, v = make_qkv(dtype=torch.float64)
    kw = kwargs_for(variant, 3, torch.float64)
    got = attention(q, k, v, variant, path="reference", **kw)
    assert torch.allclose(got, naive_for(variant, q, k, v, kw), atol=1e-12)


FAST = [v for v in VARIANTS if v != "clipped"]  # clipped has no fast path: test_clipped_* check it


@pytest.mark.parametrize("variant", FAST)
@pytest.mark.parametrize("shape", [(2, 3, 37, 16), (1, 1, 1, 8), (3, 2, 130, 32), (1, 2, 260, 16)])  # kvbias: LSE
def test_fast_equals_reference_values_and_grads(variant, shape):
    B, H, T, D = shape
    q, k, v = make_qkv(B, H, T, D, seed=T)
    assert select_path(variant, "auto", q) != "reference"  # two different paths are compared
    kw = kwargs_for(variant, H)
    if variant in ("gated", "outgate"):
        kw["gate"] = torch.rand(B, H, T, 1 if variant == "gated" else D)
    if variant == "kvbias":
        kw["kv_bias"] = tuple(torch.randn(H, D).requires_grad_() for _ in range(2))
    outs, grads = {}, {}
    for path in ("auto", "reference"):
        out = attention(q, k, v, variant, path=path, **kw)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        inputs = [q, k, v] + params_of(variant, kw)
        outs[path] = out
        grads[path] = torch.autograd.grad(out, inputs, g)
    assert torch.allclose(outs["auto"], outs["reference"], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["auto"], grads["reference"]):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)
    # and the fast path against the float64 formula
    assert torch.allclose(outs["auto"].double(), naive_for(variant, q, k, v, kw), atol=1e-5)


def test_clipped_reference_values_and_grads_against_float64_formula():
    """Clipped softmax has only the reference path: its values and gradients against the independent float64
    formula (naive64 with the clip), at gamma/zeta where the clip is active at both ends."""
    q, k, v = make_qkv(dtype=torch.float64)
    out = attention(q, k, v, "clipped", gamma=-0.05, zeta=1.02)
    ref = naive64(q, k, v, clip=(-0.05, 1.02))
    assert torch.allclose(out, ref, atol=1e-12)
    probs = []
    attention(q, k, v, "clipped", gamma=-0.05, zeta=1.02, probs_hook=lambda p: probs.append(p) or p)
    assert (probs[0] == 0).any() and (probs[0] == 1).any()  # both ends of the clip are exercised
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g)):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("variant", ["softmax1", "softmax_n", "sink", "kvbias", "softpick", "sigmoid"])
def test_fast_path_float64_exact(variant):
    """In float64 each fast path (fused LSE, or chunked) reproduces the naive formula and its gradients
    to ~1e-10."""
    T = K.KV_PREFIX_MAX_T_CPU + 3 if variant == "kvbias" else 37  # kvbias runs "prefix" at small T on the CPU
    q, k, v = make_qkv(T=T, dtype=torch.float64)
    kw = kwargs_for(variant, 3, torch.float64)
    assert select_path(variant, "auto", q) == ("chunked" if variant in ("softpick", "sigmoid") else "lse-flash-cpu")
    out = attention(q, k, v, variant, **kw)
    ref = naive_for(variant, q, k, v, kw)
    assert torch.allclose(out, ref, atol=1e-10)
    g = torch.randn_like(out)
    inputs = [q, k, v] + params_of(variant, kw)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("variant", ["softmax1", "softmax_n", "sink", "kvbias"])
def test_lse_path_without_autograd_equals_the_recorded_one(variant):
    """Under no_grad (evaluation, measurement, sampling) the LSE path skips its autograd node: the same
    output bit for bit as with gradients recorded, and the float64 formula's."""
    q, k, v = make_qkv(T=K.KV_PREFIX_MAX_T_CPU + 3 if variant == "kvbias" else 37)  # kvbias: its LSE path
    assert select_path(variant, "auto", q) == "lse-flash-cpu"
    kw = kwargs_for(variant, 3)
    recorded = attention(q, k, v, variant, **kw)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        bare = attention(q, k, v, variant, **kw)
    assert bare.grad_fn is None
    assert torch.equal(bare, recorded.detach())
    assert torch.allclose(bare.double(), naive_for(variant, q, k, v, kw), atol=1e-5)


@pytest.mark.parametrize("dtype, lse_scale", [(torch.float64, 1.0), (torch.float64, 12.0), (torch.float32, 6.0)])
def test_null_logit_lse_exact_where_softplus_turns_linear(dtype, lse_scale):
    """LSE' = log n + softplus(LSE - log n) and softplus returns its input above a threshold (20; 40 in
    float64): rows whose LSE straddles it keep exact values and gradients, sink logit's included."""
    q, k, v = [(t.detach() * math.sqrt(lse_scale)).requires_grad_() for t in make_qkv(dtype=dtype)]
    b = torch.tensor([0.5, 21.0, 38.0], dtype=dtype, requires_grad=True)  # log n on both sides of 20 and 40
    out = attention(q, k, v, "sink", sink_logit=b)
    ref = naive64(q, k, v, log_null=b)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(out.double(), ref, atol=tol)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, [q, k, v, b], g), torch.autograd.grad(ref, [q, k, v, b], g.double())):
        assert torch.allclose(a.double(), r.double(), atol=tol * 10, rtol=tol * 10)


def test_sink_gradcheck():
    q, k, v = [t.detach()[:1, :2, :5, :8].clone().requires_grad_() for t in make_qkv(dtype=torch.float64)]
    b = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, b: attention(q, k, v, "sink", sink_logit=b), (q, k, v, b))


def test_blog_identity_zero_key_and_value_prepended():
    """softmax1 attention == ordinary softmax attention over keys/values with one all-zero key and value
    prepended, attendable by every query."""
    q, k, v = make_qkv()
    B, H, T, D = q.shape
    k0 = torch.cat([torch.zeros(B, H, 1, D), k], dim=2)
    v0 = torch.cat([torch.zeros(B, H, 1, D), v], dim=2)
    mask = torch.ones(T, T + 1, dtype=torch.bool).tril(diagonal=1)  # column 0 (the null) always visible
    expected = F.scaled_dot_product_attention(q, k0, v0, attn_mask=mask)
    for path in ("auto", "reference"):
        assert torch.allclose(attention(q, k, v, "softmax1", path=path), expected, atol=1e-5)


@pytest.mark.parametrize("variant", ["softmax1", "softmax_n", "sink"])
def test_prefix_path_exact(variant):
    q, k, v = make_qkv(dtype=torch.float64)
    kw = kwargs_for(variant, 3, torch.float64)
    ln = {"softmax1": torch.tensor(0.0), "softmax_n": torch.tensor(math.log(2.5))}.get(variant)
    if variant == "sink":
        ln = kw["sink_logit"].reshape(-1, 1)
    out = K._prefix_attention(q, k, v, ln.double(), True, 1 / math.sqrt(16), 0.0)
    assert torch.allclose(out, naive_for(variant, q, k, v, kw), atol=1e-10)


def test_path_selection_and_reporting():
    q, _, _ = make_qkv()
    assert select_path("softmax", "auto", q) == "sdpa"
    assert select_path("gated", "auto", q) == "sdpa"
    assert select_path("softmax1", "auto", q) == "lse-flash-cpu"
    assert select_path("softmax1", "auto", q, dropout_p=0.1) == "prefix"
    assert select_path("clipped", "auto", q) == "reference"
    assert select_path("softmax1", "auto", q, need_probs=True) == "reference"
    assert select_path("sink", "reference", q) == "reference"
    assert select_path("outgate", "auto", q) == "sdpa"
    assert select_path("kvbias", "auto", q) == "prefix"  # T = 37: faster than the LSE kernel, by measurement
    long_q = torch.zeros(1, 1, K.KV_PREFIX_MAX_T_CPU + 1, 8)
    assert select_path("kvbias", "auto", long_q) == "lse-flash-cpu"
    assert select_path("kvbias", "auto", q, dropout_p=0.1) == "prefix"
    assert select_path("softpick", "auto", q) == select_path("sigmoid", "auto", q) == "chunked"
    assert select_path("sigmoid", "auto", q, dropout_p=0.1) == "reference"  # chunked has no dropout
    with pytest.raises(ConfigError, match="sigmoid's fast path has no attention dropout"):
        select_path("sigmoid", "fast", q, dropout_p=0.1)
    with pytest.raises(ConfigError, match="clipped"):
        select_path("clipped", "fast", q)
    with pytest.raises(ConfigError, match="unknown attention variant"):
        select_path("softmax2", "auto", q)
    core = QuietAttention(3, AttentionOptions(variant="softmax1"))
    core(*make_qkv())
    assert core.last_path == "lse-flash-cpu"


def test_probs_tap_sees_reference_probabilities():
    q, k, v = make_qkv()
    core = QuietAttention(3, AttentionOptions(variant="softmax1"))
    seen = []
    core.tap_probs.register_forward_hook(lambda m, i, o: seen.append(o))
    core(q, k, v)
    assert core.last_path == "reference"
    p = seen[0]
    assert p.shape == (2, 3, 37, 37)
    s = q.double() @ k.double().transpose(-1, -2) / 4
    s = s.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf"))
    with_null = torch.cat([s, torch.zeros(2, 3, 37, 1, dtype=torch.float64)], -1)
    expected_mass = 1 - torch.softmax(with_null, -1)[..., :-1].sum(-1)
    assert torch.allclose(1 - p.double().sum(-1), expected_mass, atol=1e-6)


@pytest.mark.parametrize("variant", ["softmax", "softmax1", "sink", "clipped", "softpick", "sigmoid", "kvbias"])
def test_dropout_on_attention_weights(variant):
    """In training mode dropout hits the weights (outputs vary), its expectation is the no-dropout output,
    and eval mode is deterministic."""
    torch.manual_seed(0)
    q, k, v = [t.detach() for t in make_qkv(1, 2, 9, 8)]
    core = QuietAttention(2, AttentionOptions(variant=variant, dropout=0.3), head_dim=8)
    if variant == "kvbias":  # a bias key and value that matter: the dropped-out column is theirs too
        with torch.no_grad():
            core.k_bias.normal_(generator=torch.Generator().manual_seed(0))
            core.v_bias.normal_(generator=torch.Generator().manual_seed(1))
    core.eval()
    clean = core(q, k, v)
    assert torch.equal(clean, core(q, k, v))
    core.train()
    samples = torch.stack([core(q, k, v) for _ in range(3000)])
    assert not torch.allclose(samples[0], samples[1])
    assert core.last_path in ("sdpa", "prefix", "reference")
    err, se = (samples.mean(0) - clean).abs(), samples.std(0) / math.sqrt(len(samples))
    assert torch.all(err <= 5 * se + 1e-4), (err / se).max()  # the mean within 5 standard errors


def test_attention_options_are_checked_once_and_frozen():
    """AttentionOptions checks every setting where it is built (one-line ConfigErrors) and is frozen:
    a compiled graph holds it as constants; dataclasses.replace makes a checked copy."""
    opts = AttentionOptions(variant="softmax_n", n=2.5, cuda_kernel="flash")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.path = "reference"
    assert dataclasses.replace(opts, path="reference").path == "reference"
    for bad, match in [
        (dict(variant="softmax2"), "unknown attention variant"),
        (dict(path="turbo"), "unknown attention path"),
        (dict(cuda_kernel="triton"), "unknown CUDA attention kernel 'triton'; choose one of auto, flash, cudnn"),
        (dict(variant="softmax_n", n=-1.0), "n must be"),
        (dict(variant="clipped", gamma=0.5), "gamma"),
        (dict(variant="clipped", path="fast"), "clipped"),
        (dict(dropout=1.0), "dropout"),
        (dict(variant="sigmoid", n=2.0), "option n=2.0 belongs to variant 'softmax_n', not 'sigmoid'"),
        (dict(variant="softmax", sigmoid_bias=-2.0), "sigmoid_bias=-2.0 belongs to variant 'sigmoid'"),
        (dict(variant="sigmoid", sigmoid_bias=math.inf), "sigmoid_bias must be a finite number"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            AttentionOptions(**bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown CUDA attention kernel"):
        attention(*make_qkv(), "softmax1", cuda_kernel="triton")
    with pytest.raises(TypeError, match="AttentionOptions"):
        QuietAttention(3, "softmax1")


@pytest.mark.parametrize("cudnn_runs", [True, False])
def test_cuda_kernel_preference_is_honoured(cudnn_runs, monkeypatch):
    """The CUDA LSE kernel follows AttentionOptions.cuda_kernel: "auto" is cuDNN where it runs, else flash,
    and flash under torch.compile; "flash" / "cudnn" pin one (a pinned kernel that cannot run leaves the
    null-key prefix path). Testable without CUDA: a meta-device q stands in for a CUDA tensor, and the
    kernels' support tests are pretended."""
    monkeypatch.setattr(K._CudaFlash, "supports", staticmethod(lambda q: True))
    monkeypatch.setattr(K._CudaCudnn, "supports", staticmethod(lambda q: cudnn_runs))
    q = torch.empty(2, 3, 16, 64, device="meta", dtype=torch.bfloat16)
    cudnn = "lse-cudnn-cuda" if cudnn_runs else "prefix"
    want = {"auto": cudnn if cudnn_runs else "lse-flash-cuda", "flash": "lse-flash-cuda", "cudnn": cudnn}
    for preference, name in want.items():
        assert select_path("softmax1", "auto", q, cuda_kernel=preference) == name
        kern = K.lse_kernel_for(q, preference)
        assert (kern.name if kern is not None else "prefix") == name
    assert K.lse_kernel_for(make_qkv()[0], "cudnn") is K._CpuFlash  # the CPU has one kernel
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert K.lse_kernel_for(q, "auto") is K._CudaFlash  # compiled cuDNN trained wrong (cuda_kernel_order)
    assert select_path("softmax1", "auto", q, cuda_kernel="cudnn") == cudnn  # pinned, it is used compiled too
    assert K.cuda_kernel_order("auto", compiling=True) == (K._CudaFlash,)
    assert K.cuda_kernel_order("auto", compiling=False) == (K._CudaCudnn, K._CudaFlash)


def test_functional_attention_passes_the_kernel_preference(monkeypatch):
    """attention(..., cuda_kernel=) reaches the kernel choice (no module state in between)."""
    seen = []
    monkeypatch.setattr(K, "lse_kernel_for", lambda q, preference: seen.append(preference))  # None: prefix
    q, k, v = make_qkv()
    out = attention(q, k, v, "softmax1", cuda_kernel="cudnn")
    assert seen == ["cudnn"]
    assert torch.allclose(out, naive_for("softmax1", q, k, v, {}).float(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_lse_kernels_return_the_natural_log_sum_exp(kernel, dtype):
    """Each CUDA LSE kernel's row log-sum-exp (natural log, shape (B, H, T)) and output match a float64
    computation on the same half-precision inputs: the identity the fast path rests on."""
    B, H, T, D = 2, 3, 257, 64
    q, k, v = [t.detach().to("cuda", dtype) for t in make_qkv(B, H, T, D)]
    kern = K.lse_kernel_for(q, kernel)
    assert kern is not None and kern.name == f"lse-{kernel}-cuda"
    scale = D ** -0.5
    out, lse, _ = kern.forward(q, k, v, True, scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device="cuda").triu(1), -math.inf)
    assert lse.shape == (B, H, T)
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=2e-3)
    tol = 1e-2 if dtype == torch.float16 else 4e-2  # output values up to ~3; bf16 keeps 8 bits
    assert torch.allclose(out.double(), torch.softmax(s, -1) @ v.double(), atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "flash", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["softmax", "softmax1", "softmax_n", "sink", "gated", "softpick", "outgate",
                                     "sigmoid", "kvbias"])
def test_cuda_fast_path_equals_reference(variant, dtype, kernel):
    """On CUDA: the fused path (an LSE kernel for half precision, the null-key prefix otherwise) equals
    the reference path in values and gradients, with either CUDA LSE kernel."""
    B, H, T, D = 2, 4, 300, 64
    q, k, v = [t.detach().to("cuda", dtype).requires_grad_() for t in make_qkv(B, H, T, D)]
    kw = kwargs_for(variant, H)
    kw["cuda_kernel"] = kernel
    kw = {key: (val.detach().cuda().requires_grad_(val.requires_grad) if torch.is_tensor(val) else val)
          for key, val in kw.items()}
    if variant in ("gated", "outgate"):
        kw["gate"] = torch.rand(B, H, T, 1 if variant == "gated" else D, device="cuda", dtype=dtype)
    if variant == "kvbias":
        kw["kv_bias"] = tuple(torch.randn(H, D, device="cuda").requires_grad_() for _ in range(2))
    if variant in V.LSE_VARIANTS:
        want = "prefix" if dtype == torch.float32 else f"lse-{'cudnn' if kernel == 'auto' else kernel}-cuda"
        assert select_path(variant, "auto", q, cuda_kernel=kernel) == want
    results = {}
    for path in ("auto", "reference"):
        out = attention(q, k, v, variant, path=path, **kw)
        g = torch.ones_like(out)
        inputs = [q, k, v] + params_of(variant, kw)
        results[path] = (out, torch.autograd.grad(out, inputs, g))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(results["auto"][0].float(), results["reference"][0].float(), atol=tol, rtol=tol)
    for a, b in zip(results["auto"][1], results["reference"][1]):
        assert torch.allclose(a.float(), b.float(), atol=tol * 5, rtol=tol * 5)


def test_the_variants_that_can_leave_mass_are_those_whose_rows_do_not_sum_to_one():
    """Review defect: variants.py said clipped cannot leave mass while the report said it can. One list
    (NULL_VARIANTS), checked against what each variant's weights do: rows of random scores that sum to 1 to
    float64 precision, or not."""
    from quietgpt.nn.attention import reference_attention
    from quietgpt.nn.variants import NULL_VARIANTS, null_log_n
    from quietgpt.report.cells import CAN_LEAVE_MASS

    q, k, v = make_qkv(dtype=torch.float64)
    leaves = {"diff"}  # rows of A1 - lambda A2 sum to 1 - lambda: test_recipes.py's test_diff_rows_sum_...
    for variant in VARIANTS:
        kw = kwargs_for(variant, 3, torch.float64)
        seen = []
        reference_attention(q, k, v, variant, log_n=null_log_n(variant, kw.get("n", 1.0), kw.get("sink_logit")),
                            gamma=kw.get("gamma", -0.03), zeta=kw.get("zeta", 1.0), kv_bias=kw.get("kv_bias"),
                            param=V.VARIANT_SPECS[variant].param(AttentionOptions(variant=variant), 37)
                            if V.VARIANT_SPECS[variant].param else None,
                            probs_hook=lambda p, seen=seen: seen.append(p) or p)
        if (seen[0].sum(-1) - 1).abs().max() > 1e-9:
            leaves.add(variant)
    assert leaves == set(NULL_VARIANTS) == set(CAN_LEAVE_MASS)
    assert "clipped" in leaves and not {"softmax", "gated", "outgate"} & leaves


def test_every_variant_option_has_one_owner_table():
    """Review defect: "this option belongs to variant X" was written three times. The variant table is the
    one source: the model's config fields and the attention core's options both come from it, and an owned
    option set on another variant is a one-line error naming its owner."""
    from quietgpt.nn import model as M
    from quietgpt.nn import variants as V

    assert M.VARIANT_FIELDS is V.VARIANT_FIELDS
    assert V.VARIANT_FIELDS == {f: v for v, s in V.VARIANT_SPECS.items() for f in s.config_fields}
    assert V.OPTION_OWNERS == {f: v for v, s in V.VARIANT_SPECS.items() for f in s.options}
    non_default = {"softmax_n": 2.0, "clip_gamma": -0.1, "clip_zeta": 1.1, "gate_init": 0.5, "sink_init": 1.0,
                   "gate_mode": "headwise", "sigmoid_bias": "-3.0"}
    assert set(non_default) == set(V.VARIANT_FIELDS)
    for name, owner in V.VARIANT_FIELDS.items():
        M.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11, attention=owner,
                    **{name: non_default[name]})
        other = "softmax1" if owner != "softmax1" else "softmax"
        with pytest.raises(ConfigError, match=f"model.{name} belongs to attention '{owner}'"):
            M.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11, attention=other,
                        **{name: non_default[name]})


@pytest.mark.parametrize("variant", ["sink", "kvbias"])
@pytest.mark.parametrize("T", [37, K.KV_PREFIX_MAX_T_CPU + 3])  # kvbias: the prefix path, then the LSE path
@pytest.mark.parametrize("path", ["auto", "reference"])
def test_per_row_parameters_equal_one_call_per_row(variant, T, path):
    """An ensemble runs its members as batch rows of one call, each row with its own sink logits or key/value
    bias ((B, H, 1) / (B, H, D)): values and every gradient equal B separate calls with shared (H, ...)
    parameters, in float64, on each path."""
    B, H, D = 3, 2, 8
    q, k, v = make_qkv(B, H, T, D, dtype=torch.float64, seed=3)
    g = torch.Generator().manual_seed(4)
    if variant == "sink":
        params = [torch.randn(B, H, dtype=torch.float64, generator=g).requires_grad_()]
        rows = lambda i: {"sink_logit": params[0][i]}
        joint = {"sink_logit": params[0].unsqueeze(-1)}
    else:
        params = [torch.randn(B, H, D, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2)]
        rows = lambda i: {"kv_bias": (params[0][i], params[1][i])}
        joint = {"kv_bias": tuple(params)}
    out = attention(q, k, v, variant, path=path, **joint)
    each = torch.cat([attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], variant, path=path, **rows(i))
                      for i in range(B)])
    assert torch.allclose(out, each, atol=1e-12)
    grad = torch.randn_like(out)
    inputs = [q, k, v, *params]
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(each, inputs, grad)):
        assert torch.allclose(a, b, atol=1e-11)
