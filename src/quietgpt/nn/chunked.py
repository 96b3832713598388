"""Exact O(T)-memory attention for normalisers with no log-sum-exp form (softpick, sigmoid attention).

A fused softmax kernel never forms the T x T scores because softmax needs only two numbers per row (the
running max and log-sum-exp) to finish a row block by block, and its backward rebuilds every probability
from the LSE. softpick has an online form too (the paper's Triton kernel keeps a running max and a running
sum of |.|) and sigmoid attention needs none, but PyTorch ships no kernel for either. So this is the
tiled pass in plain PyTorch, over blocks of queries: each block forms only its own (block x keys) scores,
computes its weights and output, and forgets them; the backward recomputes them block by block. Memory is
O(block x T) per step (O(T) for a fixed block), and autograd keeps only q, k, v (softpick: and the
output), as SDPA does. Causal blocks stop at their last query's key: the upper triangle is never
computed.

With w the weights, x the scaled and masked scores and g_ij = dO_i . v_j, the backward is

    sigmoid   w = sigmoid(x + b)                  dx = g w (1 - w)
    softpick  w = relu(d) / den, d = e^-c (e^x - 1), den = sum_j |d_j| + eps e^-c   (softmax.softpick_parts's
              terms, computed here in place)
              dx_j = (e^(x_j - c) / den) ([x_j > 0] g_j - sign(x_j) rho),   rho = sum_k g_k w_k = dO_i . O_i

(softpick: the first term is the ReLU's, the second the denominator's through |d_j|; c is a constant
of the row because the ratio does not depend on it; rho, like flash attention's D, comes from the saved
output, so no T x T pass computes it), then dq = scale dx k, dk = scale dx^T q, dv = w^T dO. Per-row
factors (1 / den, scale) are applied to the (block x D) operands of the matmuls, never to a (block x T)
one, and the (block x T) work is done in place: softpick costs about 5 such passes forward and 10
backward, sigmoid 2 and 4. The same formulas as the reference path in the same precision (fp32, fp64 for
fp64), so the two agree to rounding (tests hold them equal in values and gradients); the one difference
is at a kink: where a score is exactly 0 the reference's autograd takes the derivative 0 and this takes
the left one (a subgradient too).

No dropout here: attention's path selection runs the reference path when dropout is on.
Imports flow chunked <- variants <- attention: this module knows nothing of variants or options.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

BLOCK_ELEMENTS = 2**22  # a block's (B, H, block, Tk) scores: at most 16 MB in fp32, unless the 64-row floor binds
KINDS = ("softpick", "sigmoid")


def block_rows(B: int, H: int, Tk: int) -> int:
    """Queries per block: as many as fit BLOCK_ELEMENTS, a multiple of 64, at least 64 (so for long
    sequences memory grows as 64 x T, O(T)). A block's scores go through several elementwise passes, so
    they should stay in cache, and a causal block computes its whole last square (half of it masked):
    on the 2-core CPU (B=4, H=6, D=64, fwd+bwd) 64-128 rows ran 1.6-2x faster than the 640 that a 64 MB
    budget gave at T = 1024, and 32 rows slower again; benchmarks/attention.py went from 3.1x / 5.8x SDPA
    (sigmoid / softpick, T = 1024) to 1.3x / 2.2x."""
    rows = BLOCK_ELEMENTS // max(1, B * H * Tk)
    return max(64, rows - rows % 64)


def _block_scores(q_blk: Tensor, k_pre: Tensor, future: Tensor | None, scale: float) -> Tensor:
    """Scaled scores of a block of queries against keys 0..len(k_pre); causal (future, the block's
    (n, n) upper triangle, given): the keys after each query are -inf. Only the block's last square,
    where its own keys meet its queries, can hold any."""
    x = (q_blk * scale) @ k_pre.transpose(-2, -1)
    if future is not None:
        n = future.shape[-1]
        x[..., -n:].masked_fill_(future, -math.inf)
    return x


def _softpick_terms(x: Tensor, future: Tensor | None, eps: float,
                    keep_e: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """(d, den, e^(x - c)) with x's storage reused for e^(x - c): d = e^(x - c) - e^-c, 0 where masked.
    keep_e=False (the forward, which needs no e): d takes x's storage instead, one pass and buffer fewer."""
    c = x.amax(dim=-1, keepdim=True).clamp_(min=0.0)
    shift = torch.exp(-c)
    e = x.sub_(c).exp_()  # masked: exp(-inf) = 0
    d = e - shift if keep_e else e.sub_(shift)
    if future is not None:
        n = future.shape[-1]
        d[..., -n:].masked_fill_(future, 0.0)  # not -e^-c: masked keys add nothing to den
    den = torch.linalg.vector_norm(d, ord=1, dim=-1, keepdim=True) + eps * shift
    return d, den, e if keep_e else None


def _forward_block(kind: str, x: Tensor, v_pre: Tensor, future: Tensor | None, param: float) -> Tensor:
    """One block's output rows from its masked scores x (overwritten)."""
    if kind == "sigmoid":
        return x.add_(param).sigmoid_() @ v_pre
    d, den, _ = _softpick_terms(x, future, param, keep_e=False)
    return (d.clamp_(min=0.0) @ v_pre) / den


def _backward_block(kind, x, q_blk, g_blk, out_blk, k_pre, v_pre, future, param, scale):
    """One block's (dq, dk, dv) contributions (dk, dv over keys 0..len(k_pre)) from its masked scores x
    (overwritten)."""
    if kind == "sigmoid":
        w = x.add_(param).sigmoid_()
        dv = w.transpose(-2, -1) @ g_blk
        t = (g_blk @ v_pre.transpose(-2, -1)).mul_(w.addcmul_(w, w, value=-1.0))  # dx = g w (1 - w), w reused
        return (t @ k_pre) * scale, t.transpose(-2, -1) @ (q_blk * scale), dv
    d, den, e = _softpick_terms(x, future, param)
    rho = (g_blk * out_blk).sum(-1, keepdim=True)
    pos = d > 0
    dv = d.clamp_(min=0.0).transpose(-2, -1) @ (g_blk / den)
    t = (g_blk @ v_pre.transpose(-2, -1)).sub_(rho).where(pos, rho).mul_(e)  # dx * den
    row = scale / den
    return (t @ k_pre) * row, t.transpose(-2, -1) @ (q_blk * row), dv


def _blocks(T: int, Tk: int, block: int, is_causal: bool, device):
    """(i0, i1, kk, future) per block of queries: rows i0..i1, keys 0..kk, the causal mask's last square."""
    full = torch.ones(block, block, dtype=torch.bool, device=device).triu(1) if is_causal else None
    for i0 in range(0, T, block):
        i1 = min(i0 + block, T)
        yield i0, i1, (i1 if is_causal else Tk), (full[: i1 - i0, : i1 - i0] if is_causal else None)


class _ChunkedRowwise(torch.autograd.Function):
    """Row-wise-normalised attention by query blocks; exact forward and backward (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, kind, param, is_causal, scale, block):
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
        outs = []
        with torch.autocast(q.device.type, enabled=False):  # fp32 as promised, also under bf16 autocast
            for i0, i1, kk, future in _blocks(q.shape[-2], k.shape[-2], block, is_causal, q.device):
                x = _block_scores(qc[..., i0:i1, :], kc[..., :kk, :], future, scale)
                outs.append(_forward_block(kind, x, vc[..., :kk, :], future, param))
        out = torch.cat(outs, dim=-2)
        ctx.save_for_backward(q, k, v, out if kind == "softpick" else None)  # softpick's rho needs it
        ctx.args = (kind, param, is_causal, scale, block)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, g):
        q, k, v, out = ctx.saved_tensors
        kind, param, is_causal, scale, block = ctx.args
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        qc, kc, vc, gc = q.to(cd), k.to(cd), v.to(cd), g.to(cd)
        dq, dk, dv = torch.empty_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
        for i0, i1, kk, future in _blocks(q.shape[-2], k.shape[-2], block, is_causal, q.device):
            q_blk = qc[..., i0:i1, :]
            x = _block_scores(q_blk, kc[..., :kk, :], future, scale)
            o_blk = out[..., i0:i1, :] if out is not None else None
            dq_b, dk_b, dv_b = _backward_block(kind, x, q_blk, gc[..., i0:i1, :], o_blk, kc[..., :kk, :],
                                               vc[..., :kk, :], future, param, scale)
            dq[..., i0:i1, :] = dq_b
            dk[..., :kk, :] += dk_b
            dv[..., :kk, :] += dv_b
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def chunked_attention(kind: str, q: Tensor, k: Tensor, v: Tensor, param: float, is_causal: bool, scale: float,
                      block: int | None = None) -> Tensor:
    """Attention with row-wise weights `kind` ("softpick": param = eps; "sigmoid": param = b) by blocks of
    `block` queries (default block_rows). q (B, H, T, D), k (B, H, Tk, D), v (B, H, Tk, Dv) -> (B, H, T, Dv)
    in q's dtype, computed in fp32 (fp64 for fp64); causal needs T == Tk. Never forms more than
    (B, H, block, Tk) scores at a time."""
    if kind not in KINDS:
        raise ValueError(f"unknown row-wise attention {kind!r}; choose one of {', '.join(KINDS)}")
    if block is None:
        block = block_rows(q.shape[0], q.shape[1], k.shape[-2])
    block = max(1, min(block, q.shape[-2]))  # the causal mask is (block, block): no bigger than T
    return _ChunkedRowwise.apply(q, k, v, kind, float(param), is_causal, scale, block)
