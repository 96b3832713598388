"""The simulated ("fake") quantized model: `quantized(model, cfg, calibration)` swaps in quantized weights and
hooks activation quantizers for the duration of a with-block (the protocol: quant/__init__.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from quietgpt.errors import QuietError
from quietgpt.nn.gates import HeadGate, OutputGate
from quietgpt.nn.model import GPT
from quietgpt.quant.grids import ActQuantizer, quantize_weight
from quietgpt.quant.spec import QuantConfig

Tensor = torch.Tensor


@dataclass
class QuantState:
    """What `quantized` installed: the activation quantizers by name (for inspection and tests)."""
    config: QuantConfig
    act: dict[str, ActQuantizer]
    weights: list[str]

    def ranges(self) -> dict[str, tuple[float | None, float | None]]:
        return {k: (q.xmin, q.xmax) for k, q in self.act.items()}


def _linears(model: GPT, cfg: QuantConfig) -> list[tuple[str, nn.Module]]:
    """Every matmul layer: nn.Linear (lm_head only with cfg.head), the gated variant's HeadGate and the
    outgate variant's OutputGate (unless it is the input-independent constant)."""
    return [(name, mod) for name, mod in model.named_modules()
            if (isinstance(mod, nn.Linear | HeadGate) or (isinstance(mod, OutputGate) and mod.weight is not None))
            and (mod is not model.lm_head or cfg.head)]


def _quantized_params(model: GPT, cfg: QuantConfig) -> list[tuple[str, nn.Parameter]]:
    """The weights to quantize: every linear layer's weight (lm_head's only with cfg.head; it is the tied
    wte) and the position embeddings with cfg.embeddings."""
    out = [(f"{name}.weight", mod.weight) for name, mod in _linears(model, cfg)]
    if cfg.embeddings:
        out.append(("transformer.wpe.weight", model.transformer.wpe.weight))
    return out


@contextlib.contextmanager
def quantized(model: GPT, cfg: QuantConfig, calibration: Iterable[Tensor]) -> Iterator[QuantState]:
    """Inside the context, `model` computes the fake-quantized network of `cfg`.

    Weights are replaced by quantized copies (restored bit-exactly on exit), activation quantizers are
    hooked in, calibrated on `calibration` (int64 (B, T) token batches, from the training split), then
    fixed. The model is put in eval mode for the duration. Raises QuietError if calibration is empty.
    """
    was_training = model.training
    model.eval()
    params = _quantized_params(model, cfg)
    saved = [p.detach().clone() for _, p in params]
    act: dict[str, ActQuantizer] = {}
    handles = []

    def new_q(name: str) -> ActQuantizer:
        act[name] = ActQuantizer(cfg.a_bits, cfg.momentum, cfg.percentile)
        return act[name]

    def quant_output(module: nn.Module, name: str) -> None:
        q = new_q(name)
        handles.append(module.register_forward_hook(lambda _m, _i, out, q=q: q(out)))

    def quant_input(module: nn.Module, name: str) -> None:
        q = new_q(name)
        handles.append(module.register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]), *args[1:])))

    try:
        with torch.no_grad():
            for _, p in params:
                p.copy_(quantize_weight(p, cfg.w_bits, per_channel=cfg.per_channel, method=cfg.weight_range))
        quant_output(model.tap_embeddings, "embeddings")  # the first residual stream value / ln_1 input
        for i, block in enumerate(model.transformer.h):
            quant_output(block.attn.core.tap_probs, f"h.{i}.attn_probs")
            quant_output(block.tap_resid, f"h.{i}.resid_attn")  # x + attn(ln_1(x)), the ln_2 input
            quant_output(block.tap_out, f"h.{i}.block_out")  # x + mlp(ln_2(x)): the next LayerNorm's input
        for name, mod in _linears(model, cfg):
            quant_input(mod, f"{name}.in")
            quant_output(mod, f"{name}.out")  # for a gate: the sigmoid gate values
        n = 0
        with torch.no_grad():
            for x in calibration:
                model(x)
                n += 1
        if n == 0:
            raise QuietError("quantization needs at least one calibration batch; set calib_batches >= 1")
        for q in act.values():
            q.calibrating = False
        yield QuantState(cfg, act, [name for name, _ in params])
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for (_, p), w in zip(params, saved, strict=True):
                p.copy_(w)
        model.train(was_training)
