"""The normalisation layers a recipe may choose (model.norm), and the outlier-protected block's QK-norm.

    layernorm   nn.LayerNorm: GPT-2's, nanoGPT's (the default): (x - mean) / sqrt(var + 1e-5) * g + b
    rmsnorm     nn.RMSNorm(C, eps=1e-6): x / sqrt(mean(x^2) + eps) * g, g per channel (init 1), no bias
    ssnorm      single-scale RMSNorm (Park et al., ACL 2025, "Outlier-Safe Pre-Training"; dmis-lab/
                Outlier-Safe-Pre-Training, example_modeling_flax.py: nn.RMSNorm(feature_axes=())): the same with
                one learned scalar gain g (init 1) shared by every channel, eps 1e-6, no bias. A per-channel
                gain can grow one channel's scale into an outlier; a scalar cannot.
    QKNorm      He et al. (NeurIPS 2024, "Understanding and minimising outlier features in transformer
                training"; bobby-he/simplified_transformers, model_utils.py: RMSNorm(head_dim)) on each head's
                q and k before the dot product: x / (rms(x) + eps) * g, eps 1e-5 added to the RMS (their
                RMSNorm), g per head dimension (init 1) shared by the heads.
"""

from __future__ import annotations

import torch
from torch import nn

from quietgpt.errors import ConfigError

Tensor = torch.Tensor
NORMS = ("layernorm", "rmsnorm", "ssnorm")


class SingleScaleRMSNorm(nn.Module):
    """RMSNorm whose gain is one learned scalar (OSP's ssnorm): x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"single scale, eps={self.eps}"


class QKNorm(nn.Module):
    """He et al.'s QK-norm: x / (rms(x) + eps) * g over the head dimension, g (head_dim,) shared by the heads."""

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: Tensor) -> Tensor:
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        return x / (rms + self.eps) * self.weight


def make_norm(kind: str, width: int, bias: bool) -> nn.Module:
    """The model.norm layer of `width` channels (`bias`: LayerNorm's, as model.bias says)."""
    if kind == "layernorm":
        return nn.LayerNorm(width, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(width, eps=1e-6)
    if kind == "ssnorm":
        return SingleScaleRMSNorm(eps=1e-6)
    raise ConfigError(f"model.norm {kind!r} is unknown; choose one of {', '.join(NORMS)}")
