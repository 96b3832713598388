"""Differential attention (Ye et al., ICLR 2025, "Differential Transformer"; microsoft/unilm,
Diff-Transformer/multihead_diffattn.py, MultiheadDiffAttn): each head's queries and keys are split in two
halves, two causal softmax maps are formed, and the head attends with their difference

    A = softmax(q1 k1^T s) - lambda softmax(q2 k2^T s),      s = (head_dim / 2)^-1/2
    out = RMSNorm(A v) * (1 - lambda_init)                   (per head, over head_dim, a learned gain)
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 layer)

with lq1, lk1, lq2, lk2 learned vectors of head_dim / 2 per layer (shared by its heads), initialised N(0, 0.1),
layer 0-based, the RMSNorm's eps 1e-5 (their subln). The head's two halves are the reference's adjacent
"2 num_heads" query heads (q.view(B, T, 2H, d/2) pairs heads 2h and 2h + 1, the two halves of head h here).
The paper halves the number of heads against a baseline of the same width (8 against 16 at 1024 wide); here
the variant takes model.n_head as given: set it to half the baseline's to follow the paper.

A row of A sums to 1 - lambda (negative mass where lambda > 1): measurement reports 1 - row sum as it does for
sigmoid attention, a distance from a distribution, not abstention.

The fast path is two fused SDPA calls (the map is linear in each softmax): SDPA(q1, k1, v) - lambda SDPA(q2,
k2, v), exact in values and gradients. PyTorch's fused kernels want one head size for q, k and v, so the halves
are zero-padded back to head_dim (a zero column adds nothing to a dot product) with the scale passed
explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
SUBLN_EPS = 1e-5


def lambda_init(layer: int) -> float:
    """The reference's lambda_init_fn(depth) with depth the 0-based layer index."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def diff_lambda(lq1: Tensor, lk1: Tensor, lq2: Tensor, lk2: Tensor, init: float) -> Tensor:
    """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (a 0-d tensor; one per batch row, (B,), when the
    vectors carry a leading dimension, as an ensemble's members do)."""
    return torch.exp((lq1 * lk1).sum(-1)) - torch.exp((lq2 * lk2).sum(-1)) + init


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def diff_reference(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, *, is_causal: bool = True,
                   probs_hook: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The ground truth: both maps materialised in fp32 (fp64 for fp64 inputs), their difference (B, H, T, Tk)
    seen by `probs_hook`, times v. Before the sub-layer norm."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    (q1, q2), (k1, k2) = _split(q.to(cd)), _split(k.to(cd))
    scale = 1.0 / math.sqrt(q1.shape[-1])
    T, Tk = q.shape[-2], k.shape[-2]
    future = torch.ones(T, Tk, dtype=torch.bool, device=q.device).triu(1) if is_causal else None

    def softmax(a: Tensor, b: Tensor) -> Tensor:
        s = (a * scale) @ b.transpose(-2, -1)
        if future is not None:
            s = s.masked_fill(future, float("-inf"))
        return torch.softmax(s, dim=-1)

    lam_b = lam.to(cd).reshape(*lam.shape, *([1] * (4 - lam.dim())))  # broadcast over (B, H, T, Tk)
    probs = softmax(q1, k1) - lam_b * softmax(q2, k2)
    if probs_hook is not None:
        probs = probs_hook(probs)
    return (probs @ v.to(cd)).to(q.dtype)


def diff_fast(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, *, is_causal: bool = True) -> Tensor:
    """Two SDPA calls on the zero-padded halves: exact, never forms T x T (on paths that do not)."""
    (q1, q2), (k1, k2) = _split(q), _split(k)
    pad = q.shape[-1] - q1.shape[-1]
    scale = 1.0 / math.sqrt(q1.shape[-1])

    def sdpa(a: Tensor, b: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(F.pad(a, (0, pad)), F.pad(b, (0, pad)), v, is_causal=is_causal,
                                              scale=scale)

    lam_b = lam.to(v.dtype).reshape(*lam.shape, *([1] * (4 - lam.dim())))
    return sdpa(q1, k1) - lam_b * sdpa(q2, k2)


class DiffParams(nn.Module):
    """A layer's differential-attention parameters: lq1, lk1, lq2, lk2 (head_dim / 2,) and the sub-layer
    RMSNorm's gain (head_dim,); lambda_init from the layer index. The vectors are zeros here and drawn
    N(0, 0.1) by GPT after every shared weight (the paired design)."""

    def __init__(self, head_dim: int, layer: int):
        super().__init__()
        half = head_dim // 2
        self.lq1, self.lk1, self.lq2, self.lk2 = (nn.Parameter(torch.zeros(half)) for _ in range(4))
        self.subln = nn.RMSNorm(head_dim, eps=SUBLN_EPS)
        self.init = lambda_init(layer)

    def lam(self) -> Tensor:
        return diff_lambda(self.lq1, self.lk1, self.lq2, self.lk2, self.init)

    def finish(self, out: Tensor) -> Tensor:
        """The sub-layer norm over each head's output, times (1 - lambda_init)."""
        return self.subln(out) * (1.0 - self.init)

    def extra_repr(self) -> str:
        return f"lambda_init={self.init:.4f}"
