"""The softmax family against an independent float64 reference: softmax over the row with an explicit
0 logit (log n in general) appended, then that entry dropped."""

import math

import pytest
import torch

from quietgpt import clipped_softmax, softmax1, softmax_n
from quietgpt.errors import ConfigError


def reference_softmax_n(x: torch.Tensor, n: float, dim: int = -1) -> torch.Tensor:
    x = x.double().movedim(dim, -1)
    extra = torch.full(x.shape[:-1] + (1,), math.log(n) if n > 0 else -math.inf, dtype=torch.float64)
    p = torch.softmax(torch.cat([x, extra], dim=-1), dim=-1)[..., :-1]
    return p.movedim(-1, dim)


def test_hand_computed_values():
    # softmax1([0, 0]) = 1/3 each; softmax1([log 2]) = 2/3; softmax_n(x, n=2) for [0] = 1/3
    assert torch.allclose(softmax1(torch.tensor([0.0, 0.0])), torch.tensor([1 / 3, 1 / 3]))
    assert torch.allclose(softmax1(torch.tensor([math.log(2.0)])), torch.tensor([2 / 3]))
    assert torch.allclose(softmax_n(torch.tensor([0.0]), n=2.0), torch.tensor([1 / 3]))
    # n = 0 is ordinary softmax
    x = torch.randn(5, 7)
    assert torch.allclose(softmax_n(x, n=0.0), torch.softmax(x, -1), atol=1e-7)


@pytest.mark.parametrize("n", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_matches_reference_any_dim(n, dim):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5) * 3
    got = softmax_n(x, n=n, dim=dim)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), reference_softmax_n(x, n, dim), atol=1e-6)


def test_extreme_rows_are_finite_and_correct():
    x = torch.tensor([[-3.2e13, -1.9e11, -1e4, 1e4], [-3.2e13, -1.9e11, -1e4, -1e4], [1e4, 1e4, 1e4, 1e4]])
    p = softmax1(x)
    assert torch.isfinite(p).all()
    assert torch.allclose(p.double(), reference_softmax_n(x.double(), 1.0), atol=1e-12)
    # row 1: every logit <= -1e4, so all mass is left on nothing
    assert p[1].sum() == 0
    assert torch.allclose(p[2], torch.full((4,), 0.25))


def test_masked_entries_and_fully_masked_rows():
    ninf = float("-inf")
    x = torch.tensor([[0.0, ninf, 1.0], [ninf, ninf, ninf]], requires_grad=True)
    p = softmax1(x)
    assert p[0, 1] == 0 and torch.equal(p[1], torch.zeros(3))
    assert torch.allclose(p[0], torch.tensor([1.0, 0.0, math.e]) / (2 + math.e))
    p.sum().backward()
    assert torch.isfinite(x.grad).all()
    # ordinary softmax gives NaN on a fully masked row, as documented
    assert torch.isnan(softmax_n(x.detach(), n=0.0)[1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    torch.manual_seed(1)
    x = (torch.randn(8, 33) * 4).to(dtype)
    p = softmax1(x)
    assert p.dtype == dtype
    ref = reference_softmax_n(x.double(), 1.0)
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    assert torch.allclose(p.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("n", [0.0, 1.0, 2.5])
def test_gradcheck_float64(n):
    torch.manual_seed(2)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softmax_n(t, n=n), (x,))
    # and the gradient equals the reference formula's gradient
    g = torch.randn(3, 5, dtype=torch.float64)
    (a,) = torch.autograd.grad(softmax_n(x, n=n), x, g)
    (b,) = torch.autograd.grad(reference_softmax_n(x, n), x, g)
    assert torch.allclose(a, b, atol=1e-12)


def test_invalid_n():
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError):
            softmax_n(torch.zeros(2), n=bad)


def test_clipped_softmax():
    x = torch.tensor([[2.0, 0.0, -2.0]])
    gamma, zeta = -0.1, 1.05
    p = torch.softmax(x.double(), -1)
    expected = ((zeta - gamma) * p + gamma).clamp(0, 1)
    got = clipped_softmax(x, gamma=gamma, zeta=zeta)
    assert torch.allclose(got.double(), expected, atol=1e-7)
    assert got[0, 2] == 0  # the smallest probability is clipped to exactly zero
    assert torch.allclose(clipped_softmax(x, gamma=0.0, zeta=1.0), torch.softmax(x, -1))
    with pytest.raises(ConfigError):
        clipped_softmax(x, gamma=0.1)
    with pytest.raises(ConfigError):
        clipped_softmax(x, zeta=0.9)
