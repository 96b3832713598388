"""Which tensors carry a quantization penalty: quantize one group at a time (quant/simulated.py's groups: the
tied wte / lm_head, wpe, each block's qkv / attention out / MLP in / MLP out (and gate) weights, each block's
attention, linear and residual activations, the embedding sum, the head), everything else in float, and
report each group's perplexity ratio to the float model on the same tokens.

A group's ratio is its penalty alone; the groups' penalties need not add up to the whole configuration's
(quantization errors interact), which is reported beside them as "all".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from quietgpt.measurement.perplexity import nll_pass, ppl_of
from quietgpt.nn.model import GPT
from quietgpt.quant.simulated import quant_groups, quantized
from quietgpt.quant.spec import QuantConfig

Tensor = torch.Tensor


def group_penalties(model: GPT, cfg: QuantConfig, calib: list[Tensor], val: np.ndarray,
                    windows: Sequence[tuple[int, int]], fp_ppl: float, *, batch_size: int = 16,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """{group: ppl with only that group quantized / fp_ppl} for every group of `model` (quant_groups order),
    then "all": the whole configuration's ratio."""
    out = {}
    for group in [*quant_groups(model), "all"]:
        with quantized(model, cfg, calib, only=None if group == "all" else {group}) as q:
            nll, n = nll_pass(q.model, val, windows, batch_size=batch_size, device=device)
        out[group] = ppl_of(nll, n) / fp_ppl
    return out
