"""The GPT model: shape bookkeeping against hand-computed counts, init, training signal, generation,
observation taps, config validation, and logit parity with Hugging Face GPT-2."""

import contextlib
import math

import pytest
import torch

from quietgpt import GPT, GPTConfig, from_hf
from quietgpt.errors import ConfigError
from quietgpt.nn import kernels as K
from quietgpt.nn import variants as V

VARIANTS = ["softmax", "softmax1", "softmax_n", "sink", "clipped", "gated", "softpick", "outgate", "sigmoid",
            "kvbias"]


def tiny(**kw) -> GPTConfig:
    base = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, bias=False)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("variant, extra", [
    ("softmax", {}), ("sink", {}), ("gated", {}), ("softpick", {}), ("sigmoid", {}), ("kvbias", {}),
    ("outgate", {}), ("outgate", {"gate_mode": "headwise"}), ("outgate", {"gate_mode": "constant"})])
def test_parameter_count_hand_computed(bias, variant, extra):
    V, T, C, L, H = 37, 16, 16, 2, 2
    model = GPT(tiny(bias=bias, attention=variant, **extra))
    per_layer = 12 * C * C + 2 * C + (11 * C if bias else 0)
    per_layer += {"sink": H, "gated": C + H,  # gated: one Linear(head_dim -> 1) per head
                  "kvbias": 2 * C,  # a key and a value of head_dim per head
                  "outgate": {"elementwise": C * C + (C if bias else 0), "headwise": H * C + (H if bias else 0),
                              "constant": H}[extra.get("gate_mode", "elementwise")]}.get(variant, 0)
    total = V * C + T * C + L * per_layer + C + (C if bias else 0)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C


def test_flops_per_token_matches_nanogpt_gpt2_small():
    """GPT-2 small (vocab 50304, 1024 context): nanoGPT's estimate_mfu counts 6 N + 12 L H Q T per token,
    N = 123.59M non-embedding-position parameters; by hand: 6 * 123,587,328 + 12 * 12 * 12 * 64 * 1024."""
    model = GPT(GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=False))
    assert model.num_params() == 123_587_328
    assert model.flops_per_token() == 6 * 123_587_328 + 113_246_208
    assert model.flops_per_token(256) == 6 * 123_587_328 + 113_246_208 // 4


def test_seeded_init_is_deterministic_and_std():
    torch.manual_seed(7)
    a = GPT(tiny(n_embd=64, n_layer=4))
    torch.manual_seed(7)
    b = GPT(tiny(n_embd=64, n_layer=4))
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    w = a.transformer.h[0].mlp.c_fc.weight
    assert abs(w.std().item() - 0.02) < 0.002
    proj = a.transformer.h[0].mlp.c_proj.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 4)) < 0.001


def test_shared_weights_identical_across_variants():
    states = {}
    for v in VARIANTS:
        torch.manual_seed(3)
        states[v] = GPT(tiny(attention=v)).state_dict()
    for v in VARIANTS:
        for key, tensor in states["softmax"].items():
            assert torch.equal(tensor, states[v][key]), (v, key)


def test_gate_starts_near_gate_init():
    torch.manual_seed(0)
    model = GPT(tiny(attention="gated", gate_init=0.25))
    x = torch.randn(2, 5, 16)
    g = model.transformer.h[0].attn.gate(x)
    assert g.shape == (2, 2, 5, 1)
    assert torch.allclose(g, torch.full_like(g, 0.25), atol=0.05)
    # head h reads only its own slice of x: changing head 1's slice leaves head 0's gate alone
    x2 = x.clone()
    x2[..., 8:] += 5.0
    g2 = model.transformer.h[0].attn.gate(x2)
    assert torch.equal(g2[:, 0], g[:, 0]) and not torch.allclose(g2[:, 1], g[:, 1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_at_init_close_to_log_vocab(variant):
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=100, attention=variant))
    idx, targets = torch.randint(0, 100, (2, 4, 16))
    _, loss = model(idx, targets)
    # logits start with std ~ sqrt(n_embd) * 0.02 = 0.08, so the loss is ln(V) to within ~0.01
    assert abs(loss.item() - math.log(100)) < 0.02


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_overfits_one_batch(variant):
    torch.manual_seed(0)
    model = GPT(tiny(attention=variant))
    idx = torch.randint(0, 37, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, loss.item()


def test_generate_shapes_and_seeded_determinism():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.zeros(2, 3, dtype=torch.long)
    a = model.generate(idx, 20, temperature=1.0, top_k=5, seed=11)  # runs past block_size: context is cropped
    b = model.generate(idx, 20, temperature=1.0, top_k=5, seed=11)
    c = model.generate(idx, 20, temperature=1.0, top_k=5, seed=12)
    assert a.shape == (2, 23) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :3], idx)
    greedy = model.generate(idx, 4, temperature=0)
    logits, _ = model(idx)
    assert torch.equal(greedy[:, 3], logits[:, -1].argmax(-1))


def test_top_k_one_is_greedy():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 37, (1, 4))
    assert torch.equal(model.generate(idx, 6, top_k=1, seed=1), model.generate(idx, 6, temperature=0))


def test_crop_block_size():
    model = GPT(tiny())
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 16)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_param_groups_split_decay():
    model = GPT(tiny(attention="sink", bias=True))
    decay, no_decay = model.param_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params(non_embedding=False)


def test_observation_sites_and_paths():
    torch.manual_seed(0)
    model = GPT(tiny(attention="softmax1"))
    idx = torch.randint(0, 37, (2, 10))
    seen = {}
    with model.observe(lambda s, layer, t: seen.update({(s, layer): t.shape})):
        model(idx)
    assert seen[("embeddings", -1)] == (2, 10, 16)
    assert seen[("mlp_hidden", 1)] == (2, 10, 64)
    assert seen[("attn_probs", 0)] == (2, 2, 10, 10)
    assert model.attention_paths() == ["reference", "reference"]
    assert seen[("ln2_out", 1)] == seen[("lnf_out", 2)] == (2, 10, 16)
    assert len(seen) == 1 + 2 * 7 + 1  # embeddings, 7 per block (no gate: softmax1), ln_f
    model(idx)  # hooks are gone: fast path again, nothing recorded
    assert model.attention_paths() == ["lse-flash-cpu", "lse-flash-cpu"]
    # a returned tensor replaces the activation
    with model.observe(lambda s, layer, t: torch.zeros_like(t), sites=("block_out",)):
        logits, _ = model(idx)
    ln_f_of_zero = model.lm_head(model.transformer.ln_f(torch.zeros(16)))
    assert torch.allclose(logits[0, 0], ln_f_of_zero, atol=1e-6)


def test_fast_and_reference_model_agree():
    for v in VARIANTS:
        torch.manual_seed(0)
        model = GPT(tiny(attention=v))
        idx = torch.randint(0, 37, (2, 16))
        _, fast = model(idx, idx)
        model.set_attention_path("reference")
        _, ref = model(idx, idx)
        assert abs(fast.item() - ref.item()) < 1e-5, v


@pytest.mark.parametrize("bad, match", [
    (dict(n_embd=10, n_head=3), "divisible"),
    (dict(attention="softmax2"), "model.attention"),
    (dict(softmax_n=-1.0), "softmax_n"),
    (dict(clip_gamma=0.5), "clip_gamma"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(path="turbo"), "model.path"),
    (dict(cuda_kernel="triton"), "model.cuda_kernel 'triton' is unknown; choose one of auto, flash, cudnn"),
    (dict(attention="clipped", path="fast"), "clipped"),
    (dict(gate_init=1.0), "gate_init"),
    (dict(attention="outgate", gate_mode="rowwise"),
     "model.gate_mode 'rowwise' is unknown; choose one of elementwise, headwise, constant"),
    (dict(gate_mode="headwise"), "model.gate_mode belongs to attention 'outgate', not 'softmax'"),
    (dict(attention="sigmoid", softmax_n=2.0), "model.softmax_n belongs to attention 'softmax_n', not 'sigmoid'"),
    (dict(attention="kvbias", sink_init=1.0), "model.sink_init belongs to attention 'sink'"),
    (dict(attention="gated", clip_zeta=1.1), "model.clip_zeta belongs to attention 'clipped'"),
    (dict(attention="sigmoid", sigmoid_bias="minus two"), "model.sigmoid_bias must be 'auto'"),
    (dict(attention="sigmoid", sigmoid_bias="inf"), "model.sigmoid_bias must be 'auto'"),
    (dict(attention="softpick", sigmoid_bias="-3"), "model.sigmoid_bias belongs to attention 'sigmoid'"),
    (dict(attention="sigmoid", path="fast", dropout=0.1), "sigmoid's fast path has no attention dropout"),
])
def test_config_validation(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        tiny(**bad)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 3})
    cfg = tiny(attention="sink")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    # a number given from Python is stored as text (the field's type), so config.json round-trips
    cfg = tiny(attention="sigmoid", sigmoid_bias=-3)
    assert cfg.sigmoid_bias == "-3.0" and cfg.attention_options().sigmoid_bias == -3.0
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert tiny(attention="sigmoid").attention_options().sigmoid_bias is None  # auto: -log T per call


def test_hf_gpt2_logit_parity():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # random non-trivial biases and LayerNorm params, so the test sees them all
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = from_hf(hf).eval()
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # the state-dict form needs the config
    with pytest.raises(ConfigError):
        from_hf(hf.state_dict())
    again = from_hf(hf.state_dict(), config=ours.config).eval()
    with torch.no_grad():
        assert torch.allclose(again(idx)[0], expected, atol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", "flash", "cudnn"])
def test_cuda_kernel_preference_travels_from_config_to_the_kernel_choice(kernel, monkeypatch):
    """model.cuda_kernel becomes every block's AttentionOptions, reaches the kernel choice on each
    forward, and is recorded by to_dict (what config.json stores)."""
    seen = []
    real = K.lse_kernel_for
    monkeypatch.setattr(K, "lse_kernel_for", lambda q, preference: seen.append(preference) or real(q, preference))
    model = GPT(tiny(attention="sink", cuda_kernel=kernel, path="fast"))
    assert [b.attn.core.opts for b in model.transformer.h] == [model.config.attention_options()] * 2
    assert model.config.attention_options().cuda_kernel == kernel
    model(torch.randint(0, 37, (2, 8)))
    assert seen == [kernel, kernel] and model.attention_paths() == ["lse-flash-cpu"] * 2
    assert model.config.to_dict()["cuda_kernel"] == kernel
    model.set_attention_path("reference")  # a changed copy of the frozen options, the rest kept
    assert {b.attn.core.opts.path for b in model.transformer.h} == {"reference"}
    assert {b.attn.core.opts.cuda_kernel for b in model.transformer.h} == {kernel}
    with pytest.raises(ConfigError, match="turbo"):
        model.set_attention_path("turbo")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiles_to_one_graph_without_recompiling(variant, device):
    """torch.compile sees the whole forward as one graph (no break at the attention's path bookkeeping,
    nor, on CUDA, at the LSE kernel's choice: backend flags, cuDNN version and compute capability are
    compile-time constants) and later calls reuse it (no guard on state the first call changed). On CUDA
    it runs under bf16 autocast, where the null-logit variants take an LSE kernel, and compiling with
    cuda_kernel "auto" picks flash (kernels.cuda_kernel_order says why not cuDNN). A counting backend
    that runs the captured graph eagerly keeps this fast."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cuda = device == "cuda"
    model = GPT(tiny(attention=variant, n_embd=64 if cuda else 16)).to(device)  # CUDA: head dim 32
    compiled = torch.compile(model, backend=counting, fullgraph=True)
    x = torch.randint(0, 37, (2, 16), device=device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    for _ in range(3):
        with autocast():
            _, loss = compiled(x, x)
        loss.backward()
    compiled_paths = model.attention_paths()
    with autocast():
        _, eager_loss = model(x, x)
    assert len(graphs) == 1
    assert torch.allclose(loss, eager_loss, atol=2e-2 if cuda else 1e-6)  # CUDA: eager runs cuDNN, bf16
    assert compiled_paths == [compiled_paths[0]] * 2 and compiled_paths[0] is not None
    if cuda and variant in V.LSE_VARIANTS:
        assert compiled_paths[0] == "lse-flash-cuda"
