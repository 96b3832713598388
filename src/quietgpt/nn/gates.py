"""The two output gates, each multiplying every head's attention output by sigmoid values before c_proj.

HeadGate is Bondarenko et al. 2023's (the "gated" variant), OutputGate Qiu et al. 2025's G1 gate (the
"outgate" variant). They differ in what the gate reads (one head's slice of x, or all of x) and in how
many gates a head gets; the names keep them apart. Neither is an nn.Linear, so GPT's shared init skips
them and initialises them after every shared parameter (model.py), keeping the paired design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
GATE_MODES = ("elementwise", "headwise", "constant")  # outgate: head_dim gates per head, one, or a constant


class HeadGate(nn.Module):
    """Bondarenko et al.'s gated attention (their default, "conditional per token"): each head h has its
    own Linear(head_dim -> 1) reading that head's slice of the block input x, and its output is scaled by
    sigmoid of it. A gate near 0 lets the head switch off without parking attention on some token."""

    def __init__(self, n_head: int, head_dim: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.weight = nn.Parameter(torch.empty(n_head, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_head))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> gate values in (0, 1), (B, H, T, 1)."""
        B, T, _ = x.shape
        logits = torch.einsum("bthd,hd->bht", x.view(B, T, self.n_head, self.head_dim), self.weight)
        return torch.sigmoid(logits + self.bias.view(1, -1, 1)).unsqueeze(-1)


class OutputGate(nn.Module):
    """Qiu et al. 2025's gated attention at their G1 position ("Gated Attention for Large Language
    Models"): each head's attention output Y is multiplied by sigmoid(x W_g + b_g) before the heads are
    concatenated and c_proj mixes them, x the block's LayerNorm'd input (all of it, not one head's slice:
    unlike HeadGate). mode "elementwise": head_dim gates per head (their best); "headwise": one per head;
    "constant": one learned logit per head, input-independent (the control their ablation finds weak).

    In qiuzh20/gated_attention the gate's columns are extra outputs of q_proj, so they share its init
    and bias setting; here a Linear-like weight (out, C) that GPT initialises N(0, 0.02) with bias 0
    (so every gate starts near sigmoid(0) = 0.5). Not an nn.Linear, so GPT's shared init skips it.
    """

    def __init__(self, n_head: int, head_dim: int, n_embd: int, mode: str, bias: bool):
        super().__init__()
        self.n_head, self.head_dim, self.mode = n_head, head_dim, mode
        width = {"elementwise": n_head * head_dim, "headwise": n_head}.get(mode)
        self.weight = nn.Parameter(torch.empty(width, n_embd)) if width is not None else None
        self.bias = nn.Parameter(torch.zeros(width if width is not None else n_head)) if bias or width is None else None

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> gate values in (0, 1): (B, H, T, head_dim) elementwise, (B, H, T, 1) headwise,
        (1, H, 1, 1) constant."""
        if self.weight is None:
            return torch.sigmoid(self.bias).view(1, -1, 1, 1)
        B, T, _ = x.shape
        logits = F.linear(x, self.weight, self.bias).view(B, T, self.n_head, -1)
        return torch.sigmoid(logits).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, n_head={self.n_head}, head_dim={self.head_dim}"
