"""The quantization spec grammar: "w4a8", "w4a8-g64-gptq-rot-kv8-e8", "int8-dynamic", ... -> a frozen QuantConfig
with one canonical name.

    w<W>a<A>[-part]...        W, A: weight and activation bits, 2..16 (a16 is activations in float, in effect)

parts, in any order (the canonical name writes them in this order; a part at its default is left out):

    pc | g<N>        weight granularity: one scale per output channel, or per group of N input columns of each
                     output row (default: one scale per tensor)
    mse              weight range: the clipping threshold that minimises the squared error (default: min-max)
    gptq             GPTQ (Frantar et al. 2023): error-compensating rounding calibrated on the calibration
                     batches, damping 0.01 (default: round-to-nearest)
    ao               GPTQ's act-order (columns by decreasing Hessian diagonal); only with gptq
    smooth[<alpha>]  SmoothQuant (Xiao et al. 2023): migrate activation scale into the weights, alpha 0.5 unless
                     given (smooth0.8); its scales fold into the LayerNorms
    rot              residual-stream rotation (QuaRot, Ashkboos et al. 2024): a randomised Hadamard where the
                     width allows, else a seeded random orthogonal matrix; LayerNorms folded (not with smooth)
    p<pct>           activation ranges from per-batch percentiles (p99.99) instead of min/max
    qkv              also quantize q, k and v (the inputs of QK^T and PV) at A bits, static per tensor
    kv<B>            a B-bit KV cache: keys and values per head and token, asymmetric (not with qkv)
    e<B> | efp       the position embedding, the tied token embedding / lm_head and the head's input and
                     logits at B bits, or all in float
    noemb | nohead   keep the position embedding (noemb) or the tied wte / lm_head and its logits (nohead) in
                     float

Defaults follow each method's paper: round-to-nearest is Bondarenko et al.'s protocol ("quant_setup=all":
embeddings and head at W bits, so `w4a8` quantizes them to 4 bits); GPTQ, rot and SmoothQuant keep the
embeddings and the head in float, as their papers do (`w4a8-gptq` = `w4a8-gptq-efp`). Attention probabilities
and the residual sums are always quantized at A bits. `int8-dynamic` is PyTorch's real dynamic int8 kernels
(quant/dynamic.py). The full table with examples is docs/quantization.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

from quietgpt.errors import QuietError

INT8_DYNAMIC = "int8-dynamic"
GRAMMAR_DOC = "docs/quantization.md"
QUANT_FORMAT = (f"w<bits>a<bits>[-part...] with parts pc | g<N> | mse | gptq | ao | smooth[<alpha>] | rot | "
                f"p<pct> | qkv | kv<bits> | e<bits> | efp | noemb | nohead, or {INT8_DYNAMIC} ({GRAMMAR_DOC})")
DEFAULT_SMOOTH_ALPHA = 0.5
GPTQ_DAMP = 0.01  # GPTQ's percdamp: the Hessian's diagonal gets 1% of its mean added (the reference default)


@dataclass(frozen=True)
class QuantConfig:
    """One quantization configuration; `name` is its canonical spec (the key in results, one per config)."""
    name: str
    w_bits: int = 8
    a_bits: int = 8
    granularity: str = "tensor"  # tensor | channel | group
    group_size: int | None = None  # input columns per group (granularity "group")
    weight_range: str = "minmax"  # minmax | mse
    method: str = "rtn"  # rtn (round-to-nearest) | gptq
    act_order: bool = False  # GPTQ's act-order
    smooth: float | None = None  # SmoothQuant's alpha, None = no smoothing
    rotate: bool = False  # residual-stream rotation (QuaRot)
    percentile: float | None = None  # activations: clip each calibration batch to [100-p, p] percentiles
    qkv: bool = False  # quantize q, k, v at a_bits (static per tensor)
    kv_bits: int | None = None  # KV cache bits (per head and token, asymmetric), None = not quantized
    emb_bits: int | None = 8  # the position embedding table's bits, None = float
    head_bits: int | None = 8  # the tied wte / lm_head weight's bits, None = float (its input and logits too)
    momentum: float = 0.9  # running min-max: new = (1 - m) * batch + m * old
    kind: str = "simulated"  # "simulated": fake quantization; "dynamic": PyTorch's int8 kernels

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    @property
    def embeddings(self) -> bool:
        """Is the position embedding quantized?"""
        return self.emb_bits is not None

    @property
    def head(self) -> bool:
        """Is the tied wte / lm_head (and the head's input and logits) quantized?"""
        return self.head_bits is not None

    def to_dict(self) -> dict:
        return asdict(self)


def _default_embedding_bits(w_bits: int, method: str, smooth: float | None, rotate: bool) -> int | None:
    """The embeddings' and head's bits a method's paper uses: W bits for round-to-nearest (Bondarenko et al.
    quantize everything), float for GPTQ, QuaRot and SmoothQuant."""
    return None if (method == "gptq" or smooth is not None or rotate) else w_bits


PARTS = (  # (pattern, what the part sets), in canonical order
    (r"pc", "granularity"),
    (r"g(\d+)", "granularity"),
    (r"mse", "weight_range"),
    (r"gptq", "method"),
    (r"ao", "act_order"),
    (r"smooth(0?\.\d+)?", "smooth"),
    (r"rot", "rotate"),
    (r"p(\d+(?:\.\d+)?)", "percentile"),
    (r"qkv", "qkv"),
    (r"kv(\d+)", "kv_bits"),
    (r"e(\d+)|efp", "embeddings"),
    (r"noemb", "noemb"),
    (r"nohead", "nohead"),
)


def _bad(spec: str, why: str) -> QuietError:
    return QuietError(f"quant config {spec!r}: {why}; see {GRAMMAR_DOC}")


def _bits(spec: str, text: str, what: str) -> int:
    b = int(text)
    if not 2 <= b <= 16:
        raise _bad(spec, f"{what} must be 2..16 bits, got {b}")
    return b


def parse_quant(spec: str) -> QuantConfig:
    """A spec string -> QuantConfig with its canonical name; a QuietError of one short line naming the part it
    could not read otherwise."""
    s = str(spec).strip().lower()
    if s == INT8_DYNAMIC:  # fixed by PyTorch's kernels: int8 weights per tensor, dynamic activations, head included
        return QuantConfig(name=s, w_bits=8, a_bits=8, emb_bits=None, head_bits=8, kind="dynamic")
    head, *parts = s.split("-")
    m = re.fullmatch(r"w(\d+)a(\d+)", head)
    if not m:
        raise _bad(spec, f"it must start with w<bits>a<bits> (e.g. w4a8) or be {INT8_DYNAMIC}, not {head!r}")
    kw: dict = {"w_bits": _bits(spec, m.group(1), "weights"), "a_bits": _bits(spec, m.group(2), "activations")}
    seen: dict[str, str] = {}
    emb: tuple | None = None
    drop: set[str] = set()
    for part in parts:
        key, match = next(((k, mm) for pat, k in PARTS if (mm := re.fullmatch(pat, part))), (None, None))
        if key is None:
            raise _bad(spec, f"cannot read part {part!r}")
        if key in seen:
            raise _bad(spec, f"-{seen[key]} and -{part} both set the {key.replace('_', ' ')}; give one")
        seen[key] = part
        if part == "pc":
            kw["granularity"] = "channel"
        elif key == "granularity":
            kw["granularity"], kw["group_size"] = "group", int(match.group(1))
            if kw["group_size"] < 1:
                raise _bad(spec, "a group needs at least 1 column")
        elif key == "weight_range":
            kw["weight_range"] = "mse"
        elif key == "method":
            kw["method"] = "gptq"
        elif key == "act_order":
            kw["act_order"] = True
        elif key == "smooth":
            kw["smooth"] = float(match.group(1)) if match.group(1) else DEFAULT_SMOOTH_ALPHA
            if not 0.0 < kw["smooth"] < 1.0:
                raise _bad(spec, f"SmoothQuant's alpha must be in (0, 1), got {kw['smooth']}")
        elif key == "rotate":
            kw["rotate"] = True
        elif key == "percentile":
            kw["percentile"] = float(match.group(1))
            if not 50.0 < kw["percentile"] <= 100.0:
                raise _bad(spec, f"a percentile must be in (50, 100], got {kw['percentile']}")
        elif key == "qkv":
            kw["qkv"] = True
        elif key == "kv_bits":
            kw["kv_bits"] = _bits(spec, match.group(1), "the KV cache")
        elif key == "embeddings":
            emb = (None,) if part == "efp" else (_bits(spec, match.group(1), "the embeddings and head"),)
        else:
            drop.add(key)
    if kw.get("act_order") and kw.get("method") != "gptq":
        raise _bad(spec, "-ao (act-order) is a GPTQ option; add -gptq")
    if kw.get("smooth") is not None and kw.get("rotate"):
        raise _bad(spec, "-smooth and -rot are two ways to tame activations; choose one")
    if kw.get("qkv") and kw.get("kv_bits") is not None:
        raise _bad(spec, "-qkv and -kv<bits> both quantize keys and values; choose one")
    bits = emb[0] if emb is not None else _default_embedding_bits(kw["w_bits"], kw.get("method", "rtn"),
                                                                   kw.get("smooth"), kw.get("rotate", False))
    kw["emb_bits"] = None if "noemb" in drop else bits
    kw["head_bits"] = None if "nohead" in drop else bits
    cfg = QuantConfig(name="", **kw)
    return replace(cfg, name=canonical_name(cfg))


def canonical_name(cfg: QuantConfig) -> str:
    """The one name of a configuration: its parts in PARTS' order whatever order they were written in
    (w4a8-mse-pc and w4a8-pc-mse are one config, w4a8-pc-mse), defaults left out, numbers in their shortest
    form (p99.90 -> p99.9)."""
    if cfg.kind == "dynamic":
        return INT8_DYNAMIC
    parts = [f"w{cfg.w_bits}a{cfg.a_bits}"]
    parts += ["pc"] if cfg.granularity == "channel" else [f"g{cfg.group_size}"] if cfg.granularity == "group" else []
    parts += ["mse"] if cfg.weight_range == "mse" else []
    parts += ["gptq"] if cfg.method == "gptq" else []
    parts += ["ao"] if cfg.act_order else []
    if cfg.smooth is not None:
        parts += ["smooth" if cfg.smooth == DEFAULT_SMOOTH_ALPHA else f"smooth{_number(cfg.smooth)}"]
    parts += ["rot"] if cfg.rotate else []
    parts += [f"p{_number(cfg.percentile)}"] if cfg.percentile is not None else []
    parts += ["qkv"] if cfg.qkv else []
    parts += [f"kv{cfg.kv_bits}"] if cfg.kv_bits is not None else []
    default = _default_embedding_bits(cfg.w_bits, cfg.method, cfg.smooth, cfg.rotate)
    kept = [b for b in (cfg.emb_bits, cfg.head_bits) if b is not None]
    bits = kept[0] if kept else None  # the bits of whatever is quantized (both share them)
    if bits != default and (kept or (cfg.emb_bits is None and cfg.head_bits is None)):
        parts += ["efp" if bits is None else f"e{bits}"]
    if kept:
        parts += ["noemb"] if cfg.emb_bits is None else []
        parts += ["nohead"] if cfg.head_bits is None else []
    return "-".join(parts)


def _number(x: float) -> str:
    """The shortest text that reads back as x: 99.9 -> "99.9", 100.0 -> "100", 99.99999 -> "99.99999"."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def parse_quant_list(specs: str | Iterable[str] | None) -> list[QuantConfig]:
    """"w8a8,w4a8" or ["w8a8", "w4a8"] -> configs (duplicates by canonical name dropped, order kept); "" -> []."""
    if specs is None:
        return []
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    out: dict[str, QuantConfig] = {}
    for item in items:
        if item.strip():
            cfg = parse_quant(item)
            out.setdefault(cfg.name, cfg)
    return list(out.values())
