"""The quantization spec grammar: "w8a8", "w4a8-pc-mse", "int8-dynamic", ... -> a frozen QuantConfig.

One parser for every place that reads a spec (the CLI's --quant, train.outlier_quant, a study's quant list);
it imports nothing of the model, so the config layer can check a spec when it is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from quietgpt.errors import QuietError

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
