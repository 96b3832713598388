"""Transforms that leave a model's full-precision logits unchanged but move its outliers where quantization
minds them less. Both act on a copy the quantization pipeline owns (quant/simulated.py), never on the
caller's model.

SmoothQuant (Xiao et al., ICML 2023; mit-han-lab/smoothquant `smooth.py`): for each LayerNorm and the
linear layers that read its output, per input channel j

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (clamped to >= 1e-5)

with max|X_j| over the calibration batches (of the LayerNorm's output) and max|W_j| over every reader's
column j. The LayerNorm's gain and bias are divided by s, every reader's columns multiplied by it: X W^T =
(X / s)(W s)^T, so activation outliers move into the weights. Here ln_1 (read by c_attn and the gated
variants' gates) and ln_2 (read by c_fc); not ln_f, whose reader lm_head is the tied token embedding.

Residual-stream rotation (QuaRot, Ashkboos et al. 2024; spcl/QuaRot, torchao's spinquant prototype), for
GPT-2's pre-LayerNorm blocks as SliceGPT and QuaRot do for LayerNorm models:
1. untie the token embedding from lm_head (they become two matrices: the rotated model reads and writes the
   stream with different transforms);
2. fold every LayerNorm's gain and bias into the linear layers that read it (W diag(g), b + W beta);
3. centre everything that writes to the residual stream (the token and position embeddings' rows, both
   c_proj's output columns and biases): every stream value then has mean 0 over its channels, so a
   LayerNorm's mean subtraction does nothing and it becomes RMSNorm without a gain, x / sqrt(mean(x^2)+eps);
4. rotate the stream by an orthogonal Q: writers W <- Q^T W (b <- Q^T b, embeddings E <- E Q), readers
   W <- W Q. RMSNorm(x Q) = RMSNorm(x) Q, so the logits do not change.
Q is a randomised Hadamard matrix H diag(+-1) / sqrt(C) (QuaRot's choice: it spreads every channel evenly)
where the width C is 2^k or 12 * 2^k, else a seeded Haar-random orthogonal matrix. Only the residual stream
is rotated: QuaRot's online Hadamards inside the attention and before the MLP's down-projection are not
applied. The gated variant's per-head gate reads head slices of the stream; it becomes one dense linear
layer (DenseHeadGate, the same function) so that it can be rotated.

Both transforms are derived for GPT-2's pre-norm LayerNorm block; the recipes' other norms and the
outlier-protected block (no norm before the branches) are refused (check_transforms). OSP's embedding
projections are folded into an untied token embedding and head before anything else (fold_embedding_
projections): a deployed model would fold them the same way, and the folded matrices are then quantized as the
embedding and head are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from quietgpt.errors import QuietError
from quietgpt.nn.gates import HeadGate
from quietgpt.nn.model import GPT, GPTConfig

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- orthogonal matrices


def _paley12() -> Tensor:
    """A 12 x 12 Hadamard matrix by Paley's first construction (q = 11, which is 3 mod 4)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, jac
    return torch.eye(q + 1, dtype=torch.float64) + S


def hadamard(n: int) -> Tensor | None:
    """An n x n Hadamard matrix (entries +-1, H H^T = n I) in float64 for n = 2^k (Sylvester) or 12 * 2^k
    (Paley's 12 Kronecker Sylvester), else None."""
    base = torch.ones(1, 1, dtype=torch.float64)
    m = n
    if m % 12 == 0 and (m // 12) & (m // 12 - 1) == 0:
        base, m = _paley12(), m // 12
    if m < 1 or m & (m - 1):
        return None
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while m > 1:
        base, m = torch.kron(base, h2), m // 2
    return base


def rotation_matrix(n: int, seed: int = 0) -> tuple[Tensor, str]:
    """(an n x n orthogonal matrix in float64, what it is): H diag(s) / sqrt(n) with random signs s when a
    Hadamard of order n exists, else a Haar-random orthogonal matrix (QR of a Gaussian, signs fixed); both
    drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    H = hadamard(n)
    if H is not None:
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return H * signs.unsqueeze(0) / math.sqrt(n), "randomised Hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0), "random orthogonal"


# ----------------------------------------------------------------------------- modules of the transformed copy


class RMSNormNoGain(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last dim: a LayerNorm with its gain and bias folded away, on a
    stream whose mean is 0 (what `rotate_residual` leaves)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class DenseHeadGate(nn.Module):
    """HeadGate as one linear layer C -> H whose weight is block-diagonal (head h reads its own slice): the
    same gate values, but a full matrix that a rotation of its input can act on."""

    def __init__(self, gate: HeadGate):
        super().__init__()
        H, hd = gate.weight.shape
        dense = torch.zeros(H, H * hd, dtype=gate.weight.dtype, device=gate.weight.device)
        for h in range(H):
            dense[h, h * hd:(h + 1) * hd] = gate.weight.detach()[h]
        self.weight = nn.Parameter(dense)
        self.bias = nn.Parameter(gate.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> gate values (B, H, T, 1), as HeadGate."""
        return torch.sigmoid(F.linear(x, self.weight, self.bias)).transpose(1, 2).unsqueeze(-1)


# ----------------------------------------------------------------------------- the readers of each LayerNorm


def _readers(model: GPT) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(LayerNorm, the layers that read its output, each with a `weight` (out, C) or HeadGate's (H, head_dim))
    for ln_1, ln_2 of every block and ln_f."""
    out = []
    for block in model.transformer.h:
        gate = block.attn.gate
        gates = [gate] if gate is not None and getattr(gate, "weight", None) is not None else []
        out += [(block.ln_1, [block.attn.c_attn, *gates]), (block.ln_2, [block.mlp.c_fc])]
    return out + [(model.transformer.ln_f, [model.lm_head])]


def _column_view(reader: nn.Module) -> Tensor:
    """The reader's weight as (out, C) columns over the LayerNorm's channels (HeadGate's (H, hd) is head h's
    slice of the channels: a (1, C) row of per-channel weights, with zeros implied elsewhere)."""
    if isinstance(reader, HeadGate):
        return reader.weight.detach().reshape(1, -1)
    return reader.weight.detach()


def _scale_columns(reader: nn.Module, s: Tensor) -> None:
    """Multiply the reader's weight column j (channel j of its input) by s_j, in place."""
    with torch.no_grad():
        if isinstance(reader, HeadGate):
            reader.weight.mul_(s.reshape(reader.weight.shape).to(reader.weight.dtype))
        else:
            reader.weight.mul_(s.to(reader.weight.dtype).unsqueeze(0))


# ----------------------------------------------------------------------------- SmoothQuant


@torch.no_grad()
def channel_absmax(model: GPT, calibration: Iterable[Tensor]) -> dict[nn.Module, Tensor]:
    """max |x_j| per channel of every ln_1 and ln_2 output over the calibration batches (float64, on the CPU)."""
    found: dict[nn.Module, Tensor] = {}
    handles = []

    def hook(mod, _inp, out):
        m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).to("cpu", torch.float64)
        found[mod] = torch.maximum(found[mod], m) if mod in found else m

    for block in model.transformer.h:
        handles += [block.ln_1.register_forward_hook(hook), block.ln_2.register_forward_hook(hook)]
    try:
        for x in calibration:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


@torch.no_grad()
def smooth(model: GPT, calibration: Iterable[Tensor], alpha: float) -> dict[str, Tensor]:
    """SmoothQuant in place on `model` (a copy the caller owns), from its FP activations on `calibration`.
    Returns the scales s per LayerNorm ("h.<i>.ln_1", ...)."""
    act = channel_absmax(model, calibration)
    names = {m: f"h.{i}.{ln}" for i, b in enumerate(model.transformer.h) for ln, m in (("ln_1", b.ln_1),
                                                                                       ("ln_2", b.ln_2))}
    scales = {}
    for ln, readers in _readers(model)[:-1]:  # not ln_f: lm_head is the tied token embedding
        w_max = torch.stack([_column_view(r).abs().amax(0).to("cpu", torch.float64) for r in readers]).amax(0)
        s = (act[ln].pow(alpha) / w_max.clamp(min=1e-12).pow(1 - alpha)).clamp(min=1e-5)
        device = ln.weight.device
        ln.weight.div_(s.to(device, ln.weight.dtype))
        if ln.bias is not None:
            ln.bias.div_(s.to(device, ln.bias.dtype))
        for r in readers:
            _scale_columns(r, s.to(device))
        scales[names[ln]] = s
    return scales


# ----------------------------------------------------------------------------- recipes


def check_transforms(smooth: bool, rotate: bool, config: GPTConfig) -> None:
    """One-line QuietError if SmoothQuant (`smooth`) or the rotation (`rotate`) is asked of a model they are not
    derived for: a norm other than LayerNorm or the outlier-protected block."""
    if not (smooth or rotate) or (config.norm == "layernorm" and config.block == "prenorm"):
        return
    what = "smooth (SmoothQuant)" if smooth else "rot (QuaRot rotation)"
    raise QuietError(f"quantization {what} is derived for the pre-norm LayerNorm block, not model.norm={config.norm}, "
                     f"model.block={config.block}; quantize this model without it (docs/quantization.md)")


@torch.no_grad()
def fold_embedding_projections(model: GPT) -> bool:
    """OSP's projections into the token embedding and head, in place on a copy: wte <- wte E^T (a token's
    row enters the stream already projected), lm_head <- W P (logits = (x P^T) W^T), untied, the projections
    removed. The logits do not change (up to rounding). Returns whether there was anything to fold."""
    if model.emb_proj is None:
        return False
    wte = model.transformer.wte.weight.detach().to(torch.float64)
    E, P = model.emb_proj.weight.detach().to(torch.float64), model.head_proj.weight.detach().to(torch.float64)
    dtype = model.transformer.wte.weight.dtype
    model.lm_head.weight = nn.Parameter((wte @ P).to(dtype))  # the tied head was wte; it now reads P x
    model.transformer.wte.weight = nn.Parameter((wte @ E.T).to(dtype))
    model.emb_proj = model.head_proj = None
    return True


# ----------------------------------------------------------------------------- rotation


def _linear_with_bias(lin: nn.Linear) -> nn.Linear:
    """An nn.Linear equal to `lin` that has a bias (zeros if `lin` had none)."""
    if lin.bias is not None:
        return lin
    new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        new.bias.zero_()
    return new


@torch.no_grad()
def fold_layernorms(model: GPT) -> None:
    """Fold every LayerNorm's gain and bias into its readers (W diag(g), b + W beta) and make every writer to
    the residual stream mean-free, then replace the LayerNorms by RMSNormNoGain. In place on a copy: the
    logits do not change (up to rounding). Unties lm_head from the token embedding first."""
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
    for block in model.transformer.h:
        if isinstance(block.attn.gate, HeadGate):
            block.attn.gate = DenseHeadGate(block.attn.gate)
    model.lm_head = _linear_with_bias(model.lm_head) if model.transformer.ln_f.bias is not None else model.lm_head
    for ln, readers in _readers(model):
        g = ln.weight.detach().to(torch.float64)
        beta = ln.bias.detach().to(torch.float64) if ln.bias is not None else None
        for r in readers:
            W = r.weight.detach().to(torch.float64)
            if beta is not None and r.bias is not None:
                r.bias.add_((W @ beta).to(r.bias.dtype))
            r.weight.copy_((W * g.unsqueeze(0)).to(r.weight.dtype))
    for block in model.transformer.h:
        block.ln_1 = RMSNormNoGain(block.ln_1.eps)
        block.ln_2 = RMSNormNoGain(block.ln_2.eps)
    model.transformer.ln_f = RMSNormNoGain(model.transformer.ln_f.eps)
    for table in (model.transformer.wte.weight, model.transformer.wpe.weight):
        table.sub_(table.mean(dim=1, keepdim=True))
    for block in model.transformer.h:
        for writer in (block.attn.c_proj, block.mlp.c_proj):
            writer.weight.sub_(writer.weight.mean(dim=0, keepdim=True))
            if writer.bias is not None:
                writer.bias.sub_(writer.bias.mean())


@torch.no_grad()
def rotate_residual(model: GPT, seed: int = 0) -> str:
    """fold_layernorms, then rotate the residual stream by rotation_matrix(C, seed), in place on a copy.
    Returns what Q is ("randomised Hadamard" or "random orthogonal")."""
    fold_layernorms(model)
    Q, kind = rotation_matrix(model.config.n_embd, seed)

    def right(p: Tensor) -> None:  # p <- p Q (a reader's weight, an embedding table)
        p.copy_((p.detach().to(torch.float64) @ Q).to(p.dtype))

    def left(p: Tensor) -> None:  # p <- Q^T p (a writer's weight (C, in)); a bias (C,) likewise
        p.copy_((Q.T @ p.detach().to(torch.float64)).to(p.dtype))

    right(model.transformer.wte.weight)
    right(model.transformer.wpe.weight)
    for r in rotation_readers(model):
        right(r.weight)
    for block in model.transformer.h:
        for writer in (block.attn.c_proj, block.mlp.c_proj):
            left(writer.weight)
            if writer.bias is not None:
                left(writer.bias)
    return kind


def rotation_readers(model: GPT) -> list[nn.Module]:
    """The modules whose weights read the residual stream (after fold_layernorms): for tests and docs."""
    return [r for _, readers in _readers(model) for r in readers]


__all__ = ["DenseHeadGate", "RMSNormNoGain", "channel_absmax", "fold_layernorms", "hadamard",
           "rotate_residual", "rotation_matrix", "rotation_readers", "smooth"]
