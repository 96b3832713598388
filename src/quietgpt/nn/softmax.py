"""The softmax family: one source of truth per formula.

    softmax_n(x)_i = exp(x_i) / (n + sum_j exp(x_j))        n >= 0
    softmax1       = softmax_n with n = 1                   ("quiet attention")
    clipped        = clip((zeta - gamma) * softmax(x) + gamma, 0, 1)   (Bondarenko et al. 2023)
    softpick       = ReLU(exp(x_i) - 1) / (sum_j |exp(x_j) - 1| + eps)  (Zuhri, Fuadi, Aji 2025)
    sigmoid        = sigmoid(x_i + b), b = -log(n) by default (n the row's length)   (Ramapuram et al. 2024)

softmax_n is ordinary softmax over the row with one extra logit log(n) appended whose entry is then
dropped; the mass 1 - sum_i softmax_n(x)_i = n / (n + sum_j exp(x_j)) is what a head leaves on
"nothing". softpick's rows sum to at most 1 (often less, with many exact zeros); sigmoid's rows are not
normalised at all and may sum to more than 1. Everything here is computed in float32 (or float64 if
given float64) and returned in the input dtype.
"""

from __future__ import annotations

import math

import torch

from quietgpt.errors import ConfigError

Tensor = torch.Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision exponentials and sums lose too much; do the math in fp32 like fused kernels do.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def log_n_of(n: float) -> float:
    """log(n) for the null logit, with n = 0 mapping to -inf (ordinary softmax)."""
    if not (n >= 0.0) or math.isinf(n):
        raise ConfigError(f"softmax_n: n must be a finite number >= 0, got {n!r}")
    return math.log(n) if n > 0 else -math.inf


def softmax_with_null(x: Tensor, log_n: Tensor | float, dim: int = -1) -> Tensor:
    """exp(x_i) / (exp(log_n) + sum_j exp(x_j)) along `dim`, stable for every finite input.

    `log_n` is the logit of the null entry: a float, or a tensor broadcastable against `x` with size 1
    along `dim` (a learned per-head sink logit, say). log_n = -inf gives ordinary softmax.
    Rows that are entirely -inf give zeros when log_n is finite and NaN when log_n = -inf (as
    torch.softmax does). Gradients flow to x and, if it is a tensor that requires grad, to log_n.

    Computed through the identity the fast attention path also uses,
        softmax_n(x) = softmax(x) * sigmoid(LSE(x) - log n),
    with torch's fused, max-shifted softmax (it never overflows, and it is fast where masked -inf
    entries make a plain exp slow) and the row's log-sum-exp read off its largest probability:
    p_max = exp(max(x) - LSE), so LSE = max(x) - log(p_max), with p_max >= 1/len well conditioned.
    """
    dtype = x.dtype
    xc = x.to(_compute_dtype(x))
    ln = log_n.to(xc.dtype) if isinstance(log_n, Tensor) else torch.tensor(float(log_n), dtype=xc.dtype,
                                                                             device=x.device)
    m = xc.amax(dim=dim, keepdim=True)
    empty = m == -math.inf  # rows with nothing to attend to: softmax would be NaN there
    has_empty = bool(empty.any())
    if has_empty:
        xc = xc.masked_fill(empty, 0.0)
        m = m.masked_fill(empty, 0.0)
    p = torch.softmax(xc, dim=dim)
    lse = m - torch.log(p.amax(dim=dim, keepdim=True))
    keep = torch.sigmoid(lse - ln)  # the share of the row's mass that goes to real entries
    if has_empty:  # all mass on the null entry (0 for every real one), or NaN when there is no null
        keep = torch.where(empty, torch.where(ln == -math.inf, math.nan, 0.0), keep)
    return (p * keep).to(dtype)


def softmax_n(x: Tensor, n: float = 1.0, dim: int = -1) -> Tensor:
    """exp(x_i) / (n + sum_j exp(x_j)) along `dim`; n = 0 is ordinary softmax.

    Any shape and dim; fp16/bf16 inputs are computed in fp32 and returned in the input dtype.
    -inf entries (masked) get exactly 0. A row that is entirely -inf gives all zeros for n > 0
    (the head abstains completely) but NaN for n = 0, as ordinary softmax does.
    """
    return softmax_with_null(x, log_n_of(n), dim=dim)


def softmax1(x: Tensor, dim: int = -1) -> Tensor:
    """softmax_n with n = 1: exp(x_i) / (1 + sum_j exp(x_j)) ("quiet attention")."""
    return softmax_with_null(x, 0.0, dim=dim)


def check_clip_params(gamma: float, zeta: float) -> None:
    """Raise ConfigError unless gamma <= 0 <= 1 <= zeta (the clipped softmax's admissible range)."""
    if not gamma <= 0.0:
        raise ConfigError(f"clipped softmax: gamma must be <= 0, got {gamma!r}")
    if not zeta >= 1.0:
        raise ConfigError(f"clipped softmax: zeta must be >= 1, got {zeta!r}")


def clipped_softmax(x: Tensor, gamma: float = -0.03, zeta: float = 1.0, dim: int = -1) -> Tensor:
    """clip((zeta - gamma) * softmax(x) + gamma, 0, 1) along `dim` (Bondarenko et al. 2023).

    With gamma < 0 a probability can reach exactly 0 with finite logits, so a head can ignore tokens
    without pushing logits to extremes; the gradient is zero where the clip is active.
    """
    check_clip_params(gamma, zeta)
    dtype = x.dtype
    p = torch.softmax(x.to(_compute_dtype(x)), dim=dim)
    return ((zeta - gamma) * p + gamma).clamp(0.0, 1.0).to(dtype)


# --------------------------------------------------------------------------------------------------
# Normalisers without a log-sum-exp form: their fast attention path is chunked.py's.

SOFTPICK_EPS = 1e-8  # the default of softpick() in zaydzuhri/softpick-attention's naive_softpick_attn.py


def softpick_parts(x: Tensor, eps: float = SOFTPICK_EPS, dim: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces of softpick along `dim`, in x's own dtype: (d, den, c) with

        d   = exp(x - c) - exp(-c)                       = exp(-c) (exp(x) - 1)
        den = sum over unmasked j of |d_j| + eps exp(-c) = exp(-c) (sum_j |exp(x_j) - 1| + eps)
        c   = max(row max, 0), detached

    so softpick = relu(d) / den exactly (the exp(-c) cancels). The paper's stable form shifts by the row
    max m; shifting by max(m, 0) instead keeps exp(-c) <= 1, so a row of very negative scores cannot
    overflow. c is a constant of the row (the ratio does not depend on it), so it is detached and
    gradients stay exact. Masked entries (-inf) give d = -exp(-c): they add nothing to den and get 0.
    """
    c = x.detach().amax(dim=dim, keepdim=True).clamp(min=0.0)  # a row of -inf gives c = 0
    shift = torch.exp(-c)
    d = torch.exp(x - c) - shift
    den = torch.where(x > -math.inf, d.abs(), 0.0).sum(dim=dim, keepdim=True) + eps * shift
    return d, den, c


def softpick(x: Tensor, dim: int = -1, eps: float = SOFTPICK_EPS) -> Tensor:
    """ReLU(exp(x_i) - 1) / (sum_j |exp(x_j) - 1| + eps) along `dim` (Zuhri, Fuadi & Aji 2025, "Softpick:
    No Attention Sink, No Massive Activations with Rectified Softmax").

    Any shape and dim; computed in fp32 (fp64 for fp64) and returned in the input dtype. Every x_i <= 0
    gets exactly 0, rows sum to at most 1 (the rest is "unassigned"), -inf entries (masked) get 0 and add
    nothing to the denominator, and a row of only -inf is all zeros (not NaN). eps is in the formula's own
    units, as the paper writes it (the repository's kernels add theirs after the max shift instead, which
    only differs when sum_j |exp(x_j) - 1| is itself ~eps).
    """
    dtype = x.dtype
    d, den, _ = softpick_parts(x.to(_compute_dtype(x)), eps, dim)
    return (torch.relu(d) / den).to(dtype)


def sigmoid_bias(seq_len: int, bias: float | None = None) -> float:
    """Sigmoid attention's b: `bias` if given, else -log(seq_len), Ramapuram et al. 2024's recommendation
    (with scores near 0, n weights of sigmoid(-log n) = 1 / (n + 1) sum to about 1, like softmax's)."""
    if bias is not None:
        return float(bias)
    return -math.log(seq_len)


def sigmoid_weights(x: Tensor, bias: float) -> Tensor:
    """sigmoid(x + bias) elementwise (no row normalisation), computed in fp32 (fp64 for fp64), returned
    in the input dtype; -inf entries (masked) get exactly 0."""
    return torch.sigmoid(x.to(_compute_dtype(x)) + bias).to(x.dtype)
