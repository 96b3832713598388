"""Causal multi-head attention with a choice of normaliser, tensors (B, H, T, D).

Variants (VARIANTS):
    softmax    ordinary softmax (the baseline)
    softmax1   exp(s_i) / (1 + sum_j exp(s_j)): a head may put its weight on "nothing"
    softmax_n  exp(s_i) / (n + sum_j exp(s_j)) for a fixed n >= 0
    sink       softmax_n with n = exp(b_h), b_h a learned logit per head (gpt-oss ships this)
    clipped    clip((zeta - gamma) softmax(s) + gamma, 0, 1)   (Bondarenko et al. 2023)
    gated      softmax attention whose per-head output the model multiplies by a sigmoid gate

Every variant has a *reference* path that materialises the T x T probabilities (the ground truth,
and the only path that can show or quantize them). The fast paths never do:

* softmax / gated: PyTorch's fused `scaled_dot_product_attention` (SDPA).
* softmax1 / softmax_n / sink ("null-logit" variants), via softmax_n(S) V = softmax(S) V * sigmoid(LSE - log n):
  a fused kernel that returns its LSE ("lse-flash-cpu", "lse-cudnn-cuda", "lse-flash-cuda"), or, when none
  fits (dropout > 0, or a device/dtype without one), SDPA with one null key prepended ("prefix"). Both are
  exact in values and gradients; they live in kernels.py, whose docstring derives them.
* clipped: the clip breaks the identity above, so it always runs the reference path.

Each variant is one `Variant` entry of VARIANT_SPECS: its own option checks, its null logit, its reference
weights and its fast path. Adding a variant is adding one entry there (its formula in softmax.py and, if
it has a fused form of its own, that in kernels.py).

`path="auto"` picks the fastest exact path; "fast" insists on one (clipped has none); "reference"
forces the ground truth. The path that ran is logged at DEBUG level and kept in
`QuietAttention.last_path`, never chosen silently.

Every setting besides the tensors (variant, n, gamma/zeta, dropout, path, the CUDA LSE kernel
preference `cuda_kernel` = auto | flash | cudnn, ...) travels as one frozen `AttentionOptions`,
validated once where it is built: `GPTConfig.attention_options()` for the model, the keyword arguments
of `attention()` for the functional API. Nothing is read from module state, so a config (and the
config.json a checkpoint writes) records everything that decides what runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import CUDA_KERNELS, cuda_kernel_order, lse_kernel_for, null_attention, null_path
from .softmax import check_clip_params, clipped_softmax, log_n_of, softmax_with_null

__all__ = [
    "CUDA_KERNELS",
    "NULL_VARIANTS",
    "PATHS",
    "VARIANTS",
    "VARIANT_SPECS",
    "AttentionOptions",
    "FastPath",
    "QuietAttention",
    "Variant",
    "attention",
    "check_cuda_kernel",
    "check_path",
    "check_variant",
    "cuda_kernel_order",
    "lse_kernel_for",
    "null_log_n",
    "reference_attention",
    "select_path",
    "variant_spec",
]

Tensor = torch.Tensor
log = logging.getLogger(__name__)

PATHS = ("auto", "fast", "reference")


# --------------------------------------------------------------------------------------------------
# The variants: one Variant each in VARIANT_SPECS, built from the small pieces below.


@dataclass(frozen=True)
class FastPath:
    """A fused path: choose(q, dropout_p, cuda_kernel) -> the name of the path that will run (what
    select_path reports), run(name, q, k, v, log_n, is_causal, scale, dropout_p) -> output in q's dtype."""

    choose: Callable[[Tensor, float, str], str]
    run: Callable[..., Tensor]


@dataclass(frozen=True)
class Variant:
    """How one variant runs.

    weights     the reference path's row-normalised weights: weights(scores, log_n=, gamma=, zeta=) with
                scores scaled, fp32 (fp64 for fp64 inputs) and masked with -inf; (B, H, T, Tk) either way
    fast        its FastPath, or None: it always runs the reference path
    no_fast     why it has no fast path (the ConfigError for path="fast" says it)
    null_logit  null_logit(n, sink_logit) -> its null entry's logit (a float, or (H, 1) per head), or None
                when it has no null entry (see null_log_n); a null logit of -inf is ordinary softmax
    check       check(opts) raises ConfigError for AttentionOptions this variant cannot run, or None
    """

    weights: Callable[..., Tensor]
    fast: FastPath | None
    no_fast: str = ""
    null_logit: Callable[[float, Tensor | None], Tensor | float] | None = None
    check: Callable[[AttentionOptions], None] | None = None


def _softmax_weights(scores: Tensor, **_) -> Tensor:
    return torch.softmax(scores, dim=-1)


def _null_weights(scores: Tensor, *, log_n, **_) -> Tensor:
    return softmax_with_null(scores, log_n)


def _clipped_weights(scores: Tensor, *, gamma: float, zeta: float, **_) -> Tensor:
    return clipped_softmax(scores, gamma, zeta)


def _sdpa(path, q, k, v, log_n, is_causal, scale, dropout_p) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


SDPA = FastPath(choose=lambda q, dropout_p, cuda_kernel: "sdpa", run=_sdpa)
NULL_LOGIT = FastPath(choose=null_path, run=null_attention)  # an LSE kernel, else the null-key prefix


def _sink_logit(n: float, sink_logit: Tensor | None) -> Tensor:
    if sink_logit is None:
        raise ConfigError("attention variant 'sink' needs sink_logit, a tensor of one logit per head")
    return sink_logit.reshape(-1, 1)  # (H, 1): broadcasts over (B, H, T)


VARIANT_SPECS: dict[str, Variant] = {
    "softmax": Variant(_softmax_weights, SDPA),
    "softmax1": Variant(_null_weights, NULL_LOGIT, null_logit=lambda n, sink_logit: 0.0),
    "softmax_n": Variant(_null_weights, NULL_LOGIT, null_logit=lambda n, sink_logit: log_n_of(n),
                         check=lambda o: log_n_of(o.n)),  # raises on n < 0 or a non-finite n
    "sink": Variant(_null_weights, NULL_LOGIT, null_logit=_sink_logit),
    "clipped": Variant(_clipped_weights, None, no_fast="clipped softmax has no fused form",
                       check=lambda o: check_clip_params(o.gamma, o.zeta)),
    "gated": Variant(_softmax_weights, SDPA),  # the model multiplies each head's output by its gate
}
VARIANTS = tuple(VARIANT_SPECS)
NULL_VARIANTS = tuple(v for v, s in VARIANT_SPECS.items() if s.null_logit is not None)  # can leave mass on "nothing"


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown attention variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def variant_spec(variant: str) -> Variant:
    """VARIANT_SPECS[variant], or a ConfigError naming the variants there are."""
    check_variant(variant)
    return VARIANT_SPECS[variant]


def check_path(path: str) -> None:
    if path not in PATHS:
        raise ConfigError(f"unknown attention path {path!r}; choose one of {', '.join(PATHS)}")


def check_cuda_kernel(cuda_kernel: str) -> None:
    if cuda_kernel not in CUDA_KERNELS:
        raise ConfigError(f"unknown CUDA attention kernel {cuda_kernel!r}; choose one of {', '.join(CUDA_KERNELS)}")


@dataclass(frozen=True)
class AttentionOptions:
    """Everything the attention core needs besides its tensors, checked once when built.

    variant      one of VARIANTS
    n            softmax_n's n (>= 0; used by "softmax_n" only)
    gamma, zeta  clipped softmax's parameters (gamma <= 0 <= 1 <= zeta; used by "clipped" only)
    dropout      dropout on the attention weights, in [0, 1) (QuietAttention applies it in training only)
    path         "auto" | "fast" | "reference" (see the module docstring)
    cuda_kernel  the CUDA LSE kernel preference, "auto" | "flash" | "cudnn" (see lse_kernel_for)
    is_causal    mask future keys (then T == Tk)
    scale        score scale; None = 1 / sqrt(head dim)
    sink_init    "sink": the learned null logit b_h at init (QuietAttention's parameter; 0 = softmax1)

    Frozen: a compiled graph reads these as constants, so nothing may change them behind its back;
    `dataclasses.replace` makes a changed copy (GPT.set_attention_path does).
    """

    variant: str = "softmax1"
    n: float = 1.0
    gamma: float = -0.03
    zeta: float = 1.0
    dropout: float = 0.0
    path: str = "auto"
    cuda_kernel: str = "auto"
    is_causal: bool = True
    scale: float | None = None
    sink_init: float = 0.0

    def __post_init__(self) -> None:
        check_variant(self.variant)
        check_path(self.path)
        check_cuda_kernel(self.cuda_kernel)
        spec = VARIANT_SPECS[self.variant]
        if spec.check is not None:
            spec.check(self)
        if spec.fast is None and self.path == "fast":
            raise ConfigError(f"attention path 'fast' is not possible here ({spec.no_fast}); use path='auto'")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"attention dropout must be in [0, 1), got {self.dropout!r}")


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    variant: str,
    *,
    is_causal: bool = True,
    log_n: Tensor | float | None = None,
    gamma: float = -0.03,
    zeta: float = 1.0,
    dropout_p: float = 0.0,
    scale: float | None = None,
    probs_hook: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The ground truth: materialise scores and probabilities in fp32 (fp64 for fp64 inputs).

    `probs_hook`, if given, sees (and may replace) the (B, H, T, T) probabilities before dropout.
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(cd) * scale) @ k.to(cd).transpose(-2, -1)  # scaling q is T x D work, not T x T
    if is_causal:
        T, Tk = q.shape[-2], k.shape[-2]
        future = torch.ones(T, Tk, dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))  # in place: matmul's backward needs q and k, not scores
    if isinstance(log_n, Tensor):
        log_n = log_n.unsqueeze(-1)  # (H, 1) per-row logits -> (H, 1, 1) against (B, H, T, Tk) scores
    probs = variant_spec(variant).weights(scores, log_n=log_n, gamma=gamma, zeta=zeta)
    if probs_hook is not None:
        probs = probs_hook(probs)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs @ v.to(cd)).to(q.dtype)


def select_path(variant: str, path: str, q: Tensor, dropout_p: float = 0.0, need_probs: bool = False,
                *, cuda_kernel: str = "auto") -> str:
    """Name of the path `attention` will run: "reference", "sdpa", "lse-flash-cpu", "lse-cudnn-cuda",
    "lse-flash-cuda" or "prefix". `cuda_kernel` is the CUDA LSE kernel preference (auto | flash | cudnn).
    Raises ConfigError when `path="fast"` is asked of something that has no fast path."""
    spec = variant_spec(variant)
    check_path(path)
    if path == "reference" or need_probs or spec.fast is None:
        if path == "fast":
            why = spec.no_fast if spec.fast is None else "probabilities are observed"
            raise ConfigError(f"attention path 'fast' is not possible here ({why}); use path='auto'")
        return "reference"
    return spec.fast.choose(q, dropout_p, cuda_kernel)


def null_log_n(variant: str, n: float = 1.0, sink_logit: Tensor | None = None) -> Tensor | float | None:
    """The null entry's logit for `variant`: 0 for softmax1, log n for softmax_n, b_h (as (H, 1) so it
    broadcasts over (B, H, T)) for sink, None for variants without one."""
    spec = VARIANT_SPECS.get(variant)
    if spec is None or spec.null_logit is None:
        return None
    return spec.null_logit(n, sink_logit)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    variant: str = "softmax1",
    *,
    is_causal: bool = True,
    n: float = 1.0,
    sink_logit: Tensor | None = None,
    gamma: float = -0.03,
    zeta: float = 1.0,
    dropout_p: float = 0.0,
    scale: float | None = None,
    path: str = "auto",
    cuda_kernel: str = "auto",
    gate: Tensor | None = None,
    probs_hook: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Multi-head attention with the chosen normaliser. q (B, H, T, D), k (B, H, Tk, D),
    v (B, H, Tk, Dv) -> (B, H, T, Dv) in q's dtype. Causal attention needs T == Tk.

    The settings are AttentionOptions' (built and checked here, once). `dropout_p` is applied to the
    attention weights (pass 0 in eval mode). `sink_logit` (H,) is the "sink" variant's per-head null
    logit. `gate` (B, H, T, 1), used by the "gated" variant, multiplies each head's output.
    `probs_hook` forces the reference path.
    """
    opts = AttentionOptions(variant=variant, n=n, gamma=gamma, zeta=zeta, dropout=dropout_p, path=path,
                            cuda_kernel=cuda_kernel, is_causal=is_causal, scale=scale)
    out, _ = _attention(q, k, v, opts, sink_logit=sink_logit, gate=gate, probs_hook=probs_hook)
    return out


def _attention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions, *, sink_logit: Tensor | None = None,
               gate: Tensor | None = None, probs_hook: Callable[[Tensor], Tensor] | None = None,
               training: bool = True) -> tuple[Tensor, str]:
    """`attention` on checked options -> (output, the path that ran). training=False turns dropout off."""
    if opts.is_causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")
    variant, is_causal = opts.variant, opts.is_causal
    dropout_p = opts.dropout if training else 0.0
    scale = 1.0 / math.sqrt(q.shape[-1]) if opts.scale is None else opts.scale
    log_n = null_log_n(variant, opts.n, sink_logit)
    if isinstance(log_n, float) and log_n == -math.inf:
        variant = "softmax"  # a null logit of -inf (softmax_n's n = 0) is ordinary softmax: SDPA is its fast path
    chosen = select_path(variant, opts.path, q, dropout_p, need_probs=probs_hook is not None,
                         cuda_kernel=opts.cuda_kernel)
    if chosen == "reference":
        out = reference_attention(q, k, v, variant, is_causal=is_causal, log_n=log_n, gamma=opts.gamma,
                                  zeta=opts.zeta, dropout_p=dropout_p, scale=scale, probs_hook=probs_hook)
    else:  # the fast path select_path just chose, by name: no second round of support checks
        out = VARIANT_SPECS[variant].fast.run(chosen, q, k, v, log_n, is_causal, scale, dropout_p)
    if gate is not None:
        out = out * gate.to(out.dtype)
    return out, chosen


class QuietAttention(nn.Module):
    """The attention core as a module, run with `opts` (AttentionOptions; default softmax1): holds the
    learned sink logits (variant "sink", (H,) fp32 starting at opts.sink_init), an observation tap for the
    probabilities (`tap_probs`, an nn.Identity: hooks on it see (B, H, T, T) weights and force the
    reference path under path="auto"), and `last_path`, the path the last forward ran.

    Standalone: `QuietAttention(n_head, AttentionOptions(variant="softmax1"))`; in the model,
    `QuietAttention(cfg.n_head, cfg.attention_options())`."""

    def __init__(self, n_head: int, opts: AttentionOptions | None = None):
        super().__init__()
        opts = AttentionOptions() if opts is None else opts
        if not isinstance(opts, AttentionOptions):
            raise TypeError(f"QuietAttention takes an AttentionOptions, got {type(opts).__name__} {opts!r}")
        self.opts = opts
        # b_h = 0 starts the sink exactly at softmax1; training moves it per head.
        sink = opts.variant == "sink"
        self.sink_logit = nn.Parameter(torch.full((n_head,), float(opts.sink_init))) if sink else None
        self.tap_probs = nn.Identity()
        self.last_path: str | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None = None) -> Tensor:
        """q, k, v (B, H, T, D), gate (B, H, T, 1) or None -> (B, H, T, D) in q's dtype."""
        observed = bool(self.tap_probs._forward_hooks or self.tap_probs._forward_pre_hooks)
        out, chosen = _attention(q, k, v, self.opts, sink_logit=self.sink_logit, gate=gate,
                                 probs_hook=self.tap_probs if observed else None, training=self.training)
        if torch.compiler.is_compiling():
            # write without reading: a read would guard the compiled graph on last_path (a recompile on
            # the second call) and a logging call would split it at every layer
            self.last_path = chosen
        elif chosen != self.last_path:
            log.debug("attention %s: running the %s path", self.opts.variant, chosen)
            self.last_path = chosen
        return out

    def extra_repr(self) -> str:
        o = self.opts
        return f"variant={o.variant}, path={o.path}, cuda_kernel={o.cuda_kernel}"
