"""Causal multi-head attention with a choice of normaliser, tensors (B, H, T, D).

The variants (VARIANTS: softmax, softmax1, softmax_n, sink, clipped, gated, softpick, outgate, sigmoid,
kvbias) are one `Variant` entry each in variants.py's VARIANT_SPECS, which says what each computes and
cites its paper; this module runs them.

Every variant has a *reference* path that materialises the T x T weights (the ground truth, and the only
path that can show or quantize them: `probs_hook`). The fast paths never do:

* softmax / gated / outgate: PyTorch's fused `scaled_dot_product_attention` (SDPA).
* softmax1 / softmax_n / sink ("null-logit" variants), via softmax_n(S) V = softmax(S) V * sigmoid(LSE - log n):
  a fused kernel that returns its LSE ("lse-flash-cpu", "lse-cudnn-cuda", "lse-flash-cuda"), or, when none
  fits (dropout > 0, or a device/dtype without one), SDPA with one null key prepended ("prefix"). Both are
  exact in values and gradients; they live in kernels.py, whose docstring derives them.
* kvbias: the same LSE identity with a per-query null logit s' = q.k' and a value v' (kernels.py), or
  SDPA over [k'; keys] ("prefix").
* softpick / sigmoid: no LSE form; "chunked", an exact pass over query blocks in O(T) memory that
  recomputes them in backward (chunked.py). With dropout on they run the reference path.
* clipped: the clip breaks the identity above, so it always runs the reference path.

`path="auto"` picks the fastest exact path; "fast" insists on one (clipped has none); "reference"
forces the ground truth. The path that ran is logged at DEBUG level and kept in
`QuietAttention.last_path`, never chosen silently.

Every setting besides the tensors (variant, n, gamma/zeta, sigmoid_bias, dropout, path, the CUDA LSE kernel
preference `cuda_kernel` = auto | flash | cudnn, ...) travels as one frozen `AttentionOptions`
(options.py), validated once where it is built: `GPTConfig.attention_options()` for the model, the keyword arguments
of `attention()` for the functional API. Nothing is read from module state, so a config (and the
config.json a checkpoint writes) records everything that decides what runs. An option that belongs to
one variant (n, gamma/zeta, sink_init, sigmoid_bias) is an error on another unless it is at its default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quietgpt.errors import ConfigError
from quietgpt.nn.diff import DiffParams, diff_fast, diff_reference
from quietgpt.nn.options import AttentionOptions, check_path
from quietgpt.nn.variants import VARIANT_SPECS, null_log_n, variant_spec

Tensor = torch.Tensor
log = logging.getLogger(__name__)

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
    param: float | None = None,
    kv_bias: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The ground truth: materialise scores and probabilities in fp32 (fp64 for fp64 inputs).

    `probs_hook`, if given, sees (and may replace) the (B, H, T, T) weights before dropout. `param` is the
    variant's per-call constant (Variant.param: sigmoid's b, softpick's eps). `kv_bias` = (k' (H, D),
    v' (H, Dv)), or one pair per batch row ((B, H, D), (B, H, Dv)), makes it attention over [k'; keys],
    [v'; values] ("kvbias"): the hook sees the weights on the real keys only, whose rows then sum to 1 - the
    weight on k'. A sink's log_n may likewise be (B, H, 1), one per batch row.
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(cd) * scale) @ k.to(cd).transpose(-2, -1)  # scaling q is T x D work, not T x T
    if is_causal:
        T, Tk = q.shape[-2], k.shape[-2]
        future = torch.ones(T, Tk, dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))  # in place: matmul's backward needs q and k, not scores
    p_bias = None
    if kv_bias is not None:  # the bias key's logit for each query, (B, H, T, 1), as a per-row null logit
        log_n = (q.to(cd) * scale) @ kv_bias[0].to(cd).unsqueeze(-1)
        p_bias = torch.sigmoid(log_n - torch.logsumexp(scores, dim=-1, keepdim=True))  # the weight on k'
    elif isinstance(log_n, Tensor):
        log_n = log_n.unsqueeze(-1)  # (H, 1) per-row logits -> (H, 1, 1) against (B, H, T, Tk) scores
    probs = variant_spec(variant).weights(scores, log_n=log_n, gamma=gamma, zeta=zeta, param=param)
    if probs_hook is not None:
        probs = probs_hook(probs)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
        p_bias = F.dropout(p_bias, p=dropout_p, training=True) if p_bias is not None else None
    out = probs @ v.to(cd)
    if p_bias is not None:
        out = out + p_bias * kv_bias[1].to(cd).unsqueeze(-2)  # (B, H, T, 1) x (H, 1, Dv) or (B, H, 1, Dv)
    return out.to(q.dtype)


def select_path(variant: str, path: str, q: Tensor, dropout_p: float = 0.0, need_probs: bool = False,
                *, cuda_kernel: str = "auto") -> str:
    """Name of the path `attention` will run: "reference", "sdpa", "lse-flash-cpu", "lse-cudnn-cuda",
    "lse-flash-cuda", "prefix" or "chunked". `cuda_kernel` is the CUDA LSE kernel preference (auto |
    flash | cudnn). Raises ConfigError when `path="fast"` is asked of something that has no fast path."""
    spec = variant_spec(variant)
    check_path(path)
    chosen = "reference"
    if not (path == "reference" or need_probs or spec.fast is None):
        chosen = spec.fast.choose(q, dropout_p, cuda_kernel)
    if path == "fast" and chosen == "reference":
        why = (spec.no_fast if spec.fast is None else "probabilities are observed" if need_probs
               else f"{variant}'s fast path has no attention dropout")
        raise ConfigError(f"attention path 'fast' is not possible here ({why}); use path='auto'")
    return chosen


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
    sigmoid_bias: float | None = None,
    kv_bias: tuple[Tensor, Tensor] | None = None,
    diff_lambda: Tensor | None = None,
) -> Tensor:
    """Multi-head attention with the chosen normaliser. q (B, H, T, D), k (B, H, Tk, D),
    v (B, H, Tk, Dv) -> (B, H, T, Dv) in q's dtype. Causal attention needs T == Tk.

    The settings are AttentionOptions' (built and checked here, once). `dropout_p` is applied to the
    attention weights (pass 0 in eval mode). `sink_logit` (H,) is the "sink" variant's per-head null
    logit; `kv_bias` = (k' (H, D), v' (H, Dv)) the "kvbias" variant's learned key and value. `gate`
    (B, H, T, 1) or (B, H, T, Dv), used by "gated" and "outgate", multiplies each head's output.
    `diff_lambda`: the "diff" variant's lambda (0-d, or (B,) per batch row); its output is A v before the
    sub-layer norm (QuietAttention applies that). `probs_hook` forces the reference path.
    """
    opts = AttentionOptions(variant=variant, n=n, gamma=gamma, zeta=zeta, dropout=dropout_p, path=path,
                            cuda_kernel=cuda_kernel, is_causal=is_causal, scale=scale, sigmoid_bias=sigmoid_bias)
    out, _ = _attention(q, k, v, opts, sink_logit=sink_logit, gate=gate, probs_hook=probs_hook, kv_bias=kv_bias,
                        diff_lambda=diff_lambda)
    return out


def _attention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions, *, sink_logit: Tensor | None = None,
               gate: Tensor | None = None, probs_hook: Callable[[Tensor], Tensor] | None = None,
               training: bool = True, kv_bias: tuple[Tensor, Tensor] | None = None,
               diff_lambda: Tensor | None = None) -> tuple[Tensor, str]:
    """`attention` on checked options -> (output, the path that ran). training=False turns dropout off."""
    if opts.is_causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")
    variant, is_causal = opts.variant, opts.is_causal
    if (variant == "diff") != (diff_lambda is not None):
        raise ConfigError("diff_lambda is for attention variant 'diff' and it needs one; got variant "
                          f"{variant!r} with diff_lambda={'given' if diff_lambda is not None else None}")
    if variant == "diff":
        if q.shape[-1] % 2:
            raise ConfigError(f"attention variant 'diff' splits each head in two: head_dim must be even, got "
                              f"{q.shape[-1]}")
        chosen = select_path(variant, opts.path, q, 0.0, need_probs=probs_hook is not None)
        out = (diff_reference(q, k, v, diff_lambda, is_causal=is_causal, probs_hook=probs_hook)
               if chosen == "reference" else diff_fast(q, k, v, diff_lambda, is_causal=is_causal))
        return (out * gate.to(out.dtype) if gate is not None else out), chosen
    if (variant == "kvbias") != (kv_bias is not None):
        raise ConfigError("kv_bias (a learned key and value per head) is for attention variant 'kvbias' and "
                          f"it needs one; got variant {variant!r} with kv_bias={'given' if kv_bias else None}")
    dropout_p = opts.dropout if training else 0.0
    scale = 1.0 / math.sqrt(q.shape[-1]) if opts.scale is None else opts.scale
    spec = VARIANT_SPECS[variant]
    param = spec.param(opts, k.shape[-2]) if spec.param is not None else None
    log_n = null_log_n(variant, opts.n, sink_logit)
    if isinstance(log_n, float) and log_n == -math.inf:
        variant = "softmax"  # a null logit of -inf (softmax_n's n = 0) is ordinary softmax: SDPA is its fast path
    chosen = select_path(variant, opts.path, q, dropout_p, need_probs=probs_hook is not None,
                         cuda_kernel=opts.cuda_kernel)
    if chosen == "reference":
        out = reference_attention(q, k, v, variant, is_causal=is_causal, log_n=log_n, gamma=opts.gamma,
                                  zeta=opts.zeta, dropout_p=dropout_p, scale=scale, probs_hook=probs_hook,
                                  param=param, kv_bias=kv_bias)
    else:  # the fast path select_path just chose, by name: no second round of support checks
        out = VARIANT_SPECS[variant].fast.run(chosen, q, k, v, log_n, is_causal, scale, dropout_p, param, kv_bias)
    if gate is not None:
        out = out * gate.to(out.dtype)
    return out, chosen


class QuietAttention(nn.Module):
    """The attention core as a module, run with `opts` (AttentionOptions; default softmax1): holds the
    learned sink logits (variant "sink", (H,) fp32 starting at opts.sink_init), the learned key/value
    bias (variant "kvbias": k_bias, v_bias (H, head_dim) fp32, zeros here, which is softmax1; GPT
    initialises them N(0, 0.02) as Sun et al.'s code does), an observation tap for the weights
    (`tap_probs`, an nn.Identity: hooks on it see (B, H, T, T) weights and force the reference path
    under path="auto"), and `last_path`, the path the last forward ran.

    Standalone: `QuietAttention(n_head, AttentionOptions(variant="softmax1"))` (kvbias also needs
    `head_dim`); in the model, `QuietAttention(cfg.n_head, cfg.attention_options(), head_dim)`."""

    def __init__(self, n_head: int, opts: AttentionOptions | None = None, head_dim: int | None = None,
                 layer: int = 0):
        super().__init__()
        opts = AttentionOptions() if opts is None else opts
        if not isinstance(opts, AttentionOptions):
            raise TypeError(f"QuietAttention takes an AttentionOptions, got {type(opts).__name__} {opts!r}")
        self.opts = opts
        # b_h = 0 starts the sink exactly at softmax1; training moves it per head.
        sink = opts.variant == "sink"
        self.sink_logit = nn.Parameter(torch.full((n_head,), float(opts.sink_init))) if sink else None
        self.k_bias = self.v_bias = None
        if opts.variant == "kvbias":
            if head_dim is None:
                raise ConfigError("attention variant 'kvbias' needs head_dim: QuietAttention(n_head, opts, head_dim)")
            # zeros, not random: constructing must not draw from the RNG (GPT initialises them last)
            self.k_bias = nn.Parameter(torch.zeros(n_head, head_dim))
            self.v_bias = nn.Parameter(torch.zeros(n_head, head_dim))
        self.diff = None
        if opts.variant == "diff":
            if head_dim is None:
                raise ConfigError("attention variant 'diff' needs head_dim: QuietAttention(n_head, opts, head_dim)")
            self.diff = DiffParams(head_dim, layer)  # its lambda vectors, sub-layer norm, lambda_init of `layer`
        self.tap_probs = nn.Identity()
        self.last_path: str | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None = None) -> Tensor:
        """q, k, v (B, H, T, D), gate (B, H, T, 1), (B, H, T, D), (1, H, 1, 1) or None -> (B, H, T, D) in
        q's dtype."""
        observed = bool(self.tap_probs._forward_hooks or self.tap_probs._forward_pre_hooks)
        kv_bias = (self.k_bias, self.v_bias) if self.k_bias is not None else None
        out, chosen = _attention(q, k, v, self.opts, sink_logit=self.sink_logit,
                                 gate=gate if self.diff is None else None,
                                 probs_hook=self.tap_probs if observed else None, training=self.training,
                                 kv_bias=kv_bias, diff_lambda=self.diff.lam() if self.diff is not None else None)
        if self.diff is not None:
            out = self.diff.finish(out)
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
