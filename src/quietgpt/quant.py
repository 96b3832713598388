"""Simulated ("fake") uniform quantization of a GPT, W8A8 as in Bondarenko et al. 2023.

Fake quantization rounds a float tensor onto an integer grid and maps it straight back,
    q(x) = scale * (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point),
so a float model computes exactly what an integer pipeline with those grids would, on any CPU.

The protocol (the paper's repo, Qualcomm-AI-research/outlier-free-transformers, "quant_setup=all"):
* weights: symmetric, signed, per-tensor (option: per output channel), range from the current min-max
  (option: the MSE-optimal clipping threshold, a 100-point grid search). Biases, LayerNorm parameters and
  sink logits stay in high precision (an int32 accumulator holds biases in a real integer kernel), and so
  do kvbias's learned key and value (one vector per head, like a bias).
* activations: asymmetric, per-tensor, static ranges from a running min-max (momentum 0.9) over N
  calibration batches from the training split (option: per-batch percentile instead of min/max).
  The range always includes 0 so that zero is exact. Quantized: the input and output of every linear
  layer (and of the gated and outgate variants' gates: input, weight and gate values; outgate's
  constant gate is a per-head scale, kept in high precision like biases), the residual
  sums (the embedding sum, the sum after attention, the block output; in this pre-LN model these are
  exactly the LayerNorm inputs, so they are quantized once, not twice) and the attention probabilities
  (observing them runs attention on the reference path, the only one that materialises them).
* embeddings and head: `embeddings` quantizes the position embedding table; `head` quantizes lm_head's
  weight, input and output (the logits). wte is tied to lm_head, one matrix, so `head` decides both.

During calibration the quantizers already quantize with their running estimate, as the paper's
QuantizationManager does, so each quantizer is calibrated on the quantized values upstream of it.

Real int8 ("int8-dynamic"): beside the simulated grid, PyTorch's own dynamic int8 kernels, the protocol of the
public llama2.c softmax1 experiment: `torch.ao.quantization.quantize_dynamic(copy, {nn.Linear}, dtype=qint8)`
on a deep copy of the model, on the CPU (fbgemm/x86, onednn or qnnpack). Every nn.Linear becomes a
DynamicQuantizedLinear: int8 weights (symmetric, per tensor, min-max) and inputs quantized at run time, per
forward call (one batch of windows), per tensor, asymmetric, on the 7-bit range [0, 127] those kernels use
(reduce_range, which keeps their int16 accumulation from overflowing); the output is float. lm_head is an
nn.Linear, so the logits matmul is int8 too (its int8 weight is a copy: the tied wte lookup stays float, as
nn.Embedding has no dynamic kernel). Everything else stays float: attention scores and probabilities, the
residual sums, LayerNorms, the gated variant's HeadGate. So it is not W8A8 (no static ranges, no quantized
probabilities or residuals): a deployment path, reported beside the simulated grid, with its wall time.

Differences from the paper's code, on purpose: its LayerNorm weights are also quantized and its attention
scores (QK^T) are re-quantized before the softmax; here LayerNorm parameters stay float and scores are not
quantized (the probabilities after the normaliser are, which is where softmax vs softmax1 differ). Its
fc1 + activation are fused (one quantizer after the ReLU); here c_fc's output is quantized before the GELU
as well as after it (the GELU output is c_proj's input).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import QuietError
from .model import GPT, HeadGate, OutputGate

Tensor = torch.Tensor

QUANT_FORMAT = (
    "w<bits>a<bits> with bits 2..16 (e.g. w8a8, w4a8, w8a6, w16a16), optionally followed by -pc "
    "(per-channel weights), -mse (MSE-optimal weight range), -p<pct> (activation percentile clipping, "
    "e.g. -p99.99), -noemb (keep position embeddings FP), -nohead (keep lm_head/wte and logits FP); or "
    "int8-dynamic (PyTorch's real dynamic int8 linear kernels, CPU)"
)
INT8_DYNAMIC = "int8-dynamic"


@dataclass(frozen=True)
class QuantConfig:
    name: str  # the canonical spec string, e.g. "w8a8" or "w4a8-pc-mse"; the key in perplexity results
    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = False  # weights: one scale per output row instead of per tensor
    weight_range: str = "minmax"  # minmax | mse
    percentile: float | None = None  # activations: clip each calibration batch to [100-p, p] percentiles
    embeddings: bool = True  # quantize the position embedding table
    head: bool = True  # quantize lm_head (tied to wte): weight, input and logits
    momentum: float = 0.9  # running min-max: new = (1 - m) * batch + m * old
    kind: str = "simulated"  # "simulated": fake quantization (this module's grids); "dynamic": PyTorch's int8 kernels

    def to_dict(self) -> dict:
        return asdict(self)


def parse_quant(spec: str) -> QuantConfig:
    """"w8a8", "w4a8-pc", "w8a8-mse-p99.99", "int8-dynamic", ... -> QuantConfig; QuietError (one line) otherwise."""
    s = spec.strip().lower()
    if s == INT8_DYNAMIC:  # fixed by PyTorch's kernels: int8 weights per tensor, dynamic activations, head included
        return QuantConfig(name=s, w_bits=8, a_bits=8, embeddings=False, head=True, kind="dynamic")
    m = re.fullmatch(r"w(\d+)a(\d+)((?:-[a-z0-9.]+)*)", s)
    bad = QuietError(f"unknown quant config {spec!r}; use {QUANT_FORMAT}")
    if not m:
        raise bad
    w_bits, a_bits = int(m.group(1)), int(m.group(2))
    if not (2 <= w_bits <= 16 and 2 <= a_bits <= 16):
        raise bad
    kw: dict = {}
    for opt in filter(None, m.group(3).split("-")):
        if opt == "pc":
            kw["per_channel"] = True
        elif opt == "mse":
            kw["weight_range"] = "mse"
        elif opt == "noemb":
            kw["embeddings"] = False
        elif opt == "nohead":
            kw["head"] = False
        elif re.fullmatch(r"p\d+(\.\d+)?", opt) and 50.0 < float(opt[1:]) <= 100.0:
            kw["percentile"] = float(opt[1:])
        else:
            raise bad
    return QuantConfig(name=s, w_bits=w_bits, a_bits=a_bits, **kw)


def parse_quant_list(specs: str | Iterable[str] | None) -> list[QuantConfig]:
    """"w8a8,w4a8" or ["w8a8", "w4a8"] -> configs (duplicates dropped, order kept); "" -> []."""
    if specs is None:
        return []
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    out: dict[str, QuantConfig] = {}
    for item in items:
        if item.strip():
            cfg = parse_quant(item)
            out.setdefault(cfg.name, cfg)
    return list(out.values())


# ----------------------------------------------------------------------------- grids


def fake_quant(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """scale * (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point), elementwise.

    The plain formula (round half to even, like torch.round); scale and zero_point broadcast against x
    (per-channel: shape (C, 1)). Inside the representable range the error is at most scale / 2.
    """
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def symmetric_scale(absmax: Tensor, bits: int) -> Tensor:
    """Signed symmetric grid [-2^(b-1), 2^(b-1) - 1] * scale covering [-absmax, absmax]."""
    return torch.clamp(absmax, min=1e-8) / (2 ** (bits - 1) - 1)


def asymmetric_params(xmin: float, xmax: float, bits: int) -> tuple[float, int]:
    """Unsigned grid [0, 2^b - 1] covering [xmin, xmax] widened to include 0 -> (scale, zero_point)."""
    xmin, xmax = min(float(xmin), 0.0), max(float(xmax), 1e-8)
    qmax = 2**bits - 1
    scale = (xmax - xmin) / qmax
    zero_point = int(min(max(round(-xmin / scale), 0), qmax))
    return scale, zero_point


def quantize_weight(w: Tensor, bits: int, *, per_channel: bool = False, method: str = "minmax") -> Tensor:
    """Symmetric fake-quantized copy of a weight (out, in), per tensor or per output row.

    method "minmax" covers max |w|; "mse" picks the clipping threshold among 100 fractions
    (0.01..1) of max |w| that minimises the squared error (per row when per_channel)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    wf = w.detach().float()
    rows = wf.reshape(wf.shape[0], -1) if per_channel else wf.reshape(1, -1)
    absmax = rows.abs().amax(dim=1, keepdim=True)  # (R, 1)
    if method == "minmax":
        best = absmax
    elif method == "mse":
        best, best_err = absmax, torch.full_like(absmax, math.inf)
        for frac in torch.linspace(0.01, 1.0, 100).tolist():
            cand = absmax * frac
            err = (fake_quant(rows, symmetric_scale(cand, bits), 0.0, qmin, qmax) - rows).pow(2).sum(1, keepdim=True)
            better = err < best_err
            best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    else:
        raise QuietError(f"unknown weight range method {method!r}; use minmax or mse")
    out = fake_quant(rows, symmetric_scale(best, bits), 0.0, qmin, qmax)
    return out.reshape(w.shape).to(w.dtype)


class ActQuantizer:
    """Asymmetric per-tensor activation quantizer with a static range.

    While `calibrating`, each call updates a running min-max (momentum m: new = (1-m) batch + m old;
    the first batch sets it) and then quantizes with the updated range; afterwards the range is fixed.
    """

    def __init__(self, bits: int, momentum: float = 0.9, percentile: float | None = None):
        self.bits, self.momentum, self.percentile = bits, momentum, percentile
        self.calibrating = True
        self.xmin: float | None = None
        self.xmax: float | None = None
        self.scale, self.zero_point = 1.0, 0

    def _batch_range(self, x: Tensor) -> tuple[float, float]:
        if self.percentile is None:
            lo, hi = torch.aminmax(x.detach())
            return float(lo), float(hi)
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        lo = max(1, math.ceil((1.0 - self.percentile / 100.0) * n))
        hi = max(1, math.ceil(self.percentile / 100.0 * n))
        return float(flat.kthvalue(lo).values), float(flat.kthvalue(hi).values)

    def __call__(self, x: Tensor) -> Tensor:
        if self.calibrating:
            lo, hi = self._batch_range(x)
            if self.xmin is None:
                self.xmin, self.xmax = lo, hi
            else:
                m = self.momentum
                self.xmin = (1 - m) * lo + m * self.xmin
                self.xmax = (1 - m) * hi + m * self.xmax
            self.scale, self.zero_point = asymmetric_params(self.xmin, self.xmax, self.bits)
        elif self.xmin is None:
            raise QuietError("activation quantizer used before calibration; pass at least one calibration batch")
        # fake_quant with the integer zero point folded into the clamp bounds, in place on one new tensor:
        # clamp(round(x / s) + z, 0, qmax) - z == clamp(round(x / s), -z, qmax - z). Four vectorised passes
        # are ~40x faster on CPU than torch.fake_quantize_per_tensor_affine (tests check they agree).
        y = x.float() * (1.0 / self.scale)
        y.round_().clamp_(-self.zero_point, 2**self.bits - 1 - self.zero_point).mul_(self.scale)
        return y.to(x.dtype)


# ----------------------------------------------------------------------------- the quantized model


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


# ----------------------------------------------------------------------------- real int8 (PyTorch's kernels)


def quantized_engines() -> list[str]:
    """The quantized CPU engines of this torch build (torch.backends.quantized.supported_engines without "none")."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_dynamic(cfg: QuantConfig, device: str | torch.device) -> None:
    """QuietError (one line, naming the config and the fix) unless PyTorch's dynamic int8 kernels run here: they
    exist for the CPU only, and only in a torch build with a quantized engine."""
    dev = torch.device(device)
    if dev.type != "cpu":
        raise QuietError(f"quant config {cfg.name} runs PyTorch's dynamic int8 kernels, which exist for the CPU only, "
                         f"not {dev}; measure with --device cpu, or leave {cfg.name} out of --quant")
    if not quantized_engines():
        raise QuietError(f"quant config {cfg.name} needs a quantized engine (fbgemm, x86, onednn or qnnpack) and this "
                         f"torch build has none; install a standard torch build, or leave {cfg.name} out of --quant")


def int8_dynamic(model: GPT) -> GPT:
    """A deep copy of `model` on the CPU, in eval mode, whose every nn.Linear (lm_head included) is PyTorch's
    DynamicQuantizedLinear (quantize_dynamic, qint8); `model` itself is untouched. Call check_dynamic first."""
    from torch.ao.quantization import quantize_dynamic

    qmodel = copy.deepcopy(model).to("cpu").eval()
    # torch marks torch.ao.quantization deprecated in favour of torchao (a separate package, not a quietgpt
    # dependency; its notice says "removed in 2.10", yet 2.13 still ships it): quantize_dynamic still runs the
    # fbgemm/x86/onednn/qnnpack int8 kernels the llama2.c experiment used, so keep it, and keep its two
    # deprecation notices (the API, the quantized tensor types) off the one-line CLI.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        return quantize_dynamic(qmodel, {nn.Linear}, dtype=torch.qint8, inplace=True)
