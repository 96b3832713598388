"""The optimizer as a variable: OrthoAdam against AdamW (identity basis, rotated problem), Muon's split of the
parameters and its share of the schedule, exact resume, and bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quietgpt import GPT, GPTConfig
from quietgpt.config import load_config
from quietgpt.errors import ConfigError
from quietgpt.training.loop import train
from quietgpt.training.optim import Chained, OrthoAdam, build_optimizer, haar_orthogonal, rotate


def quadratic(n_out: int, shape: tuple[int, ...], seed: int = 0):
    """A least-squares loss on a parameter of `shape`: 0.5 ||M vec(p) - b||^2 (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    return torch.randn(n_out, n, generator=g, dtype=torch.float64), torch.randn(n_out, generator=g, dtype=torch.float64)


def run(opt_cls, p0: torch.Tensor, loss_fn, steps: int = 6, **kw) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(p).backward()
        opt.step()
    return p.detach()


def test_rotation_is_the_kronecker_product_of_the_axis_bases():
    g = torch.Generator().manual_seed(1)
    q0, q1 = haar_orthogonal(3, g).double(), haar_orthogonal(4, g).double()
    assert torch.allclose(q0 @ q0.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(rotate(x, [q0, q1]).reshape(-1), torch.kron(q0, q1) @ x.reshape(-1), atol=1e-12)
    assert torch.allclose(rotate(rotate(x, [q0, q1]), [q0, q1], transpose=True), x, atol=1e-12)
    assert torch.equal(rotate(x, [None, None]), x)


def test_orthoadam_without_rotation_is_adamw_exactly():
    M, b = quadratic(7, (3, 4))
    loss = lambda p: 0.5 * ((M @ p.reshape(-1) - b) ** 2).sum()
    p0 = torch.randn(3, 4, dtype=torch.float64)
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = run(OrthoAdam, p0, loss, max_rotate_dim=0, **kw)
    ref = run(torch.optim.AdamW, p0, loss, foreach=False, **kw)
    assert torch.equal(ours, ref)
    # explicit identity bases: the rotated code path, the same numbers up to rounding
    p = torch.nn.Parameter(p0.clone())
    opt = OrthoAdam([p], **kw)
    opt.bases[id(p)] = [torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64)]
    for _ in range(6):
        opt.zero_grad()
        loss(p).backward()
        opt.step()
    assert torch.allclose(p.detach(), ref, atol=1e-12, rtol=0)


def test_orthoadam_on_a_problem_equals_adamw_on_the_rotated_problem():
    """OrthoAdam with basis R on L(p) takes the steps AdamW takes on L'(p') = L(R^T p') from p' = R p."""
    M, b = quadratic(9, (3, 4), seed=2)
    loss = lambda p: 0.5 * ((M @ p.reshape(-1) - b) ** 2).sum()
    p0 = torch.randn(3, 4, dtype=torch.float64)
    kw = dict(lr=0.03, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    p = torch.nn.Parameter(p0.clone())
    opt = OrthoAdam([p], seed=5, **kw)
    g = torch.Generator().manual_seed(5)  # the same bases in float64, orthogonal to double precision
    q0, q1 = haar_orthogonal(3, g, torch.float64), haar_orthogonal(4, g, torch.float64)
    assert torch.allclose(q0.float(), opt.bases[id(p)][0]) and torch.allclose(q1.float(), opt.bases[id(p)][1])
    opt.bases[id(p)] = [q0, q1]
    R = torch.kron(q0, q1)
    assert not torch.allclose(R, torch.eye(12, dtype=torch.float64))  # a real rotation
    for _ in range(8):
        opt.zero_grad()
        loss(p).backward()
        opt.step()
    rotated = run(torch.optim.AdamW, R @ p0.reshape(-1), lambda pr: loss(R.T @ pr), steps=8, foreach=False, **kw)
    assert torch.allclose(R @ p.detach().reshape(-1), rotated, atol=1e-10, rtol=0)
    # and plain AdamW on L itself goes elsewhere: the basis matters, as Kaul et al. rely on
    plain = run(torch.optim.AdamW, p0, loss, steps=8, foreach=False, **kw)
    assert not torch.allclose(plain, p.detach(), atol=1e-4)


def tiny_model(attention: str = "sink") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, attention=attention))


# The block matmul weights of a 2-layer model, by hand: what Muon may take (Keller Jordan's rule: hidden
# matmul weights only; embeddings, the head, gains, biases, sink logits, kvbias's key and value vectors and
# the per-head gate vectors go to AdamW). Outgate's gate is a full (out, C) matmul over the block input.
MATMULS = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                        "mlp.c_proj")}
OUTGATE = {f"transformer.h.{i}.attn.gate.weight" for i in range(2)}


@pytest.mark.parametrize("attention, extra", [(v, {}) for v in ("softmax", "softmax1", "softmax_n", "sink", "clipped",
                                                                "gated", "softpick", "outgate", "sigmoid", "kvbias")]
                         + [("outgate", {"gate_mode": "headwise"}), ("outgate", {"gate_mode": "constant"})])
def test_muon_takes_the_block_matmul_weights_and_adamw_the_rest(attention, extra):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, attention=attention,
                          **extra))
    tc = load_config("default", {"train.optimizer": "muon", "train.learning_rate": "1e-3"}).train
    opt = build_optimizer(model, tc, "cpu")
    assert isinstance(opt, Chained)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    want = MATMULS | (OUTGATE if attention == "outgate" and extra.get("gate_mode") != "constant" else set())
    assert in_muon == want
    rest = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert rest == set(names.values()) - want and "transformer.wte.weight" in rest
    decays = {names[id(p)]: g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert decays["transformer.wte.weight"] == tc.weight_decay and decays["transformer.ln_f.weight"] == 0.0


def test_the_schedule_moves_muons_rate_in_proportion():
    """train_step itself sets each group's rate: AdamW's groups get the scheduled lr, Muon's lr x muon_lr /
    learning_rate (so warmup and decay apply to both)."""
    from quietgpt.training.step import NonFiniteGuard, build_step_parts, train_step

    model = tiny_model("sink")
    tc = load_config("default", {"train.optimizer": "muon", "train.learning_rate": "1e-3", "train.muon_lr": "0.02",
                                 "train.compile": "false"}).train
    parts = build_step_parts(model, tc, torch.device("cpu"))
    x = torch.randint(0, 40, (2, 16))
    train_step(parts, [(x, x)], it=0, lr=5e-4, guard=NonFiniteGuard(tc, torch.device("cpu")))
    muon, adamw = parts.optimizer.optimizers
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(0.02 * 5e-4 / 1e-3)]
    assert {g["lr"] for g in adamw.param_groups} == {5e-4}


def tiny_run(tmp_path, name: str, optimizer: str, iters: int, resume: bool = False) -> dict:
    cfg = load_config("default", {
        "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32, "train.batch_size": 4,
        "train.max_iters": iters, "train.lr_decay_iters": 8, "train.warmup_iters": 1, "train.eval_interval": 4,
        "train.eval_iters": 2, "train.log_interval": 1, "data.synthetic_tokens": 20000, "train.threads": 1,
        "data.cache_dir": str(tmp_path / "cache"), "train.optimizer": optimizer,
        "train.out_dir": str(tmp_path / name)})
    return train(cfg, resume=resume, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "orthoadam"])
def test_resume_is_exact_and_the_loss_falls(tmp_path, optimizer):
    whole = tiny_run(tmp_path, "whole", optimizer, 8)
    tiny_run(tmp_path, "split", optimizer, 4)
    split = tiny_run(tmp_path, "split", optimizer, 8, resume=True)
    assert split["val_loss"] == whole["val_loss"] and split["train_loss"] == whole["train_loss"]
    rows = [json.loads(ln) for ln in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.05  # it trains


@pytest.mark.parametrize("sets, needle", [
    ({"train.optimizer": "sgd"}, "train.optimizer 'sgd' is unknown"),
    ({"train.muon_lr": "0.01"}, "train.muon_lr is an option of train.optimizer=muon"),
    ({"train.optimizer": "muon", "train.orthoadam_max_dim": "8"}, "option of train.optimizer=orthoadam"),
])
def test_bad_optimizer_options_are_one_line_errors(sets, needle):
    with pytest.raises(ConfigError) as e:
        load_config("default", sets)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_quietgpts_muon_is_torchs_with_the_newton_schulz_dtype_as_the_only_change():
    """ns_dtype None: torch.optim.Muon step for step, to the bit. float32 (the CPU's): equal to a float64
    Newton-Schulz written from Keller Jordan's formula to float32 rounding, same-shaped matrices batched."""
    from quietgpt.training.optim import Muon, newton_schulz

    def reference(g, steps=5, a=3.4445, b=-4.7750, c=2.0315):
        x = g.double()
        x = x.T if g.shape[0] > g.shape[1] else x
        x = x / x.norm().clamp(min=1e-7)
        for _ in range(steps):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        return (x.T if g.shape[0] > g.shape[1] else x).float()

    torch.manual_seed(0)
    shapes = [(48, 16), (48, 16), (16, 64), (16, 16)]
    for ns_dtype in (None, torch.float32):
        mine = [torch.randn(*s, requires_grad=True) for s in shapes]
        theirs = [w.detach().clone().requires_grad_() for w in mine]
        a = Muon(mine, lr=0.02, adjust_lr_fn="original", ns_dtype=ns_dtype)
        b = torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="original")
        for step in range(3):
            for ws in (mine, theirs):
                for i, w in enumerate(ws):
                    w.grad = torch.sin(torch.arange(w.numel(), dtype=torch.float32).view(w.shape) * (i + step + 1))
            a.step()
            b.step()
        if ns_dtype is None:
            assert all(torch.equal(x, y) for x, y in zip(mine, theirs))
        else:  # bfloat16 against float32 iterations: close, not equal
            assert all(torch.allclose(x, y, atol=3e-2) and not torch.equal(x, y) for x, y in zip(mine, theirs))
    g = torch.randn(3, 40, 12)
    out = newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    for i in range(3):
        assert torch.allclose(out[i], reference(g[i]), atol=2e-5)
        assert torch.allclose(out[i], newton_schulz(g[i], (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32), atol=1e-6)
