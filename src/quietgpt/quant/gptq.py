"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, ICLR 2023): quantize a linear layer's weight column by column,
each column's rounding error spread over the columns not yet quantized so that the layer's output on the
calibration inputs moves as little as possible.

Follows IST-DASLab/gptq's `GPTQ.fasterquant` step for step: H = 2/n sum x x^T over the calibration inputs
(`Hessian`); dead inputs (H_jj = 0) get H_jj = 1 and their weight column 0; act-order permutes the columns by
decreasing H_jj; 1% of mean(diag H) is added to the diagonal (damping 0.01); the upper Cholesky factor U of
H^-1 drives a blocked loop (128 columns a block): q = quant(w_j), err = (w_j - q) / U_jj, the rest of the
block gets err * U_j,rest and the later blocks the block's errors at once. Scales: per tensor or per output
row from the whole weight before the loop; per group, from the group's columns (already updated by the
errors of the earlier blocks) when its first column is reached, in the order the loop visits columns (with
act-order that is the permuted order, as the reference code does without its static_groups option). H here
is the mean over input rows where the reference divides by the number of sequences: a constant factor, to
which every step is invariant (the damping is relative to mean(diag H)).

Two choices of quietgpt's: the grid is symmetric, the one round-to-nearest uses (quant/grids.py), so that
the two methods differ only in how they round (the reference's default grid is asymmetric; its --sym flag
gives this one); and the arithmetic is float64 (the matrices here are small, and it keeps the Cholesky
factorisation stable without the reference's retry).
"""

from __future__ import annotations

import math

import torch

from quietgpt.quant.grids import fake_quant, row_scales

Tensor = torch.Tensor


class Hessian:
    """Running H = 2/n sum_i x_i x_i^T (in, in) over every row x_i of the inputs seen, in float64 (GPTQ's
    add_batch: each batch is weighted so that H stays the mean over all n rows)."""

    def __init__(self, columns: int):
        self.H = torch.zeros(columns, columns, dtype=torch.float64)
        self.n = 0

    def add(self, x: Tensor) -> None:
        """x (..., in): a batch of layer inputs."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
        m = rows.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        rows = rows * math.sqrt(2.0 / self.n)
        self.H += rows.T @ rows


def gptq_quantize(W: Tensor, H: Tensor, bits: int, *, granularity: str = "channel", group_size: int | None = None,
                  method: str = "minmax", act_order: bool = False, damp: float = 0.01,
                  blocksize: int = 128) -> Tensor:
    """The GPTQ-quantized (fake-quantized: on the grid, in float) copy of W (out, in) given the input Hessian
    H (in, in) of its calibration inputs; granularity "tensor" | "channel" | "group" (group_size columns).
    Returned in W's dtype; W and H are not modified."""
    out_dtype = W.dtype
    W = W.detach().to(dtype=torch.float64, device="cpu").clone()
    H = H.detach().to(dtype=torch.float64, device="cpu").clone()
    columns = W.shape[1]
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = None
    if granularity == "tensor":
        scale = row_scales(W.reshape(1, -1), bits, method)  # (1, 1): broadcasts over every row
    elif granularity == "channel":
        scale = row_scales(W, bits, method)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    idx = torch.arange(columns)
    H[idx, idx] += damp * torch.mean(torch.diagonal(H))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1, dtype=W.dtype), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if granularity == "group" and (i1 + i) % group_size == 0:
                # as the reference: from W, i.e. the columns as the earlier blocks left them (this block's
                # own updates live in W1 until the block ends)
                scale = row_scales(W[:, i1 + i:i1 + i + group_size], bits, method)
            w, d = W1[:, i], U1[i, i]
            q = fake_quant(w.unsqueeze(1), scale, 0.0, qmin, qmax).flatten()
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(out_dtype)
