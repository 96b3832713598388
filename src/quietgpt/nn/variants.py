"""The attention variants: one `Variant` entry each in VARIANT_SPECS, built from the small pieces below.

    softmax    ordinary softmax (the baseline)
    softmax1   exp(s_i) / (1 + sum_j exp(s_j)): a head may put its weight on "nothing"
    softmax_n  exp(s_i) / (n + sum_j exp(s_j)) for a fixed n >= 0
    sink       softmax_n with n = exp(b_h), b_h a learned logit per head (gpt-oss ships this)
    clipped    clip((zeta - gamma) softmax(s) + gamma, 0, 1)   (Bondarenko et al. 2023)
    gated      softmax attention whose per-head output the model multiplies by a sigmoid gate (Bondarenko)
    softpick   ReLU(exp(s_i) - 1) / (sum_j |exp(s_j) - 1| + eps)   (Zuhri, Fuadi & Aji 2025)
    outgate    softmax attention whose per-head output the model multiplies by sigmoid(x W_g), Qiu et al.
               2025's G1 gate (elementwise, headwise or a learned constant: model.gate_mode)
    sigmoid    sigmoid(s_i + b), b = -log(T) by default, no row normalisation   (Ramapuram et al. 2024)
    kvbias     softmax over [k'; keys] with values [v'; values], k' and v' learned per head (Sun et al. 2024)
    diff       softmax(q1 k1^T s) - lambda softmax(q2 k2^T s), halves of each head's q and k, lambda learned per
               layer, a sub-layer RMSNorm after (Ye et al. 2025, Differential Transformer; nn/diff.py)

A Variant holds its reference weights (a formula of softmax.py), its fast path (a FastPath: which path
runs for given inputs, and running it: SDPA, kernels.py's LSE paths, chunked.py's blocked pass), its
option checks, its null logit and which AttentionOptions fields are its own. Adding a variant is adding
one entry here (its formula in softmax.py and, if it has a fused form of its own, that in kernels.py);
attention.py runs them.

"Unassigned mass" (1 - the row sum of the T x T weights, measured for every variant; NULL_VARIANTS are
those whose rows need not sum to 1) means what a head put on nothing for softmax1, softmax_n, sink and
kvbias (kvbias: the weight on k'), the rows' shortfall for softpick, and for clipped what the clip took
(negative where zeta > 1 pushed a row above 1). Sigmoid rows are not normalised: 1 - row sum is reported as it
is, negative when a row sums to more than 1 (over-assigned), so there it measures the distance from a
distribution, not abstention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from quietgpt.errors import ConfigError
from quietgpt.nn.chunked import chunked_attention
from quietgpt.nn.kernels import kv_bias_attention, kv_bias_path, null_attention, null_path
from quietgpt.nn.softmax import (
    SOFTPICK_EPS,
    check_clip_params,
    clipped_softmax,
    log_n_of,
    sigmoid_bias,
    sigmoid_weights,
    softmax_with_null,
    softpick,
)

Tensor = torch.Tensor


class VariantOptions(Protocol):
    """The fields of options.AttentionOptions a variant's check and param read (a Protocol, so this table
    needs nothing from options.py, which is built on it)."""

    n: float
    gamma: float
    zeta: float
    sigmoid_bias: float | None


@dataclass(frozen=True)
class FastPath:
    """A fused path: choose(q, dropout_p, cuda_kernel) -> the name of the path that will run (what
    select_path reports; "reference" when it cannot run these), run(name, q, k, v, log_n, is_causal, scale,
    dropout_p, param, kv_bias) -> output in q's dtype."""

    choose: Callable[[Tensor, float, str], str]
    run: Callable[..., Tensor]


@dataclass(frozen=True)
class Variant:
    """How one variant runs.

    weights     the reference path's weights: weights(scores, log_n=, gamma=, zeta=, param=) with scores
                scaled, fp32 (fp64 for fp64 inputs) and masked with -inf; (B, H, T, Tk) either way
    fast        its FastPath, or None: it always runs the reference path
    no_fast     why it has no fast path (the ConfigError for path="fast" says it)
    null_logit  null_logit(n, sink_logit) -> its null entry's logit (a float, or (H, 1) per head), or None
                when it has no fixed null entry (see null_log_n); a null logit of -inf is ordinary softmax
    check       check(opts) raises ConfigError for options this variant cannot run, or None
    param       param(opts, Tk) -> the per-call constant its weights take (sigmoid's b, softpick's eps), or None
    options     the AttentionOptions fields that belong to it: another variant must leave them at default
    config_fields  the GPTConfig fields that belong to it (model.softmax_n, model.gate_mode, ...); the one
                table of ownership: VARIANT_FIELDS and OPTION_OWNERS below are read off these entries
    unassigned  its rows need not sum to 1, so measurement reports 1 - row sum (NULL_VARIANTS)
    renormalised  its head output is renormalised after the weights (diff's per-head RMSNorm), so 1 - row
                sum is mass subtracted before a rescale, not a head abstaining (RENORMALISED; the report
                says so instead of "heads abstain")
    fast_dropout  its fast path supports attention dropout (else dropout runs the reference path)
    """

    weights: Callable[..., Tensor]
    fast: FastPath | None
    no_fast: str = ""
    null_logit: Callable[[float, Tensor | None], Tensor | float] | None = None
    check: Callable[[VariantOptions], None] | None = None
    param: Callable[[VariantOptions, int], float] | None = None
    options: tuple[str, ...] = ()
    config_fields: tuple[str, ...] = ()
    unassigned: bool = False
    renormalised: bool = False
    fast_dropout: bool = True


def _softmax_weights(scores: Tensor, **_) -> Tensor:
    return torch.softmax(scores, dim=-1)


def _null_weights(scores: Tensor, *, log_n, **_) -> Tensor:
    return softmax_with_null(scores, log_n)


def _clipped_weights(scores: Tensor, *, gamma: float, zeta: float, **_) -> Tensor:
    return clipped_softmax(scores, gamma, zeta)


def _softpick_weights(scores: Tensor, *, param: float, **_) -> Tensor:
    return softpick(scores, eps=param)


def _sigmoid_weights(scores: Tensor, *, param: float, **_) -> Tensor:
    return sigmoid_weights(scores, param)


def _sdpa(path, q, k, v, log_n, is_causal, scale, dropout_p, param, kv_bias) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


def _null_run(path, q, k, v, log_n, is_causal, scale, dropout_p, param, kv_bias) -> Tensor:
    return null_attention(path, q, k, v, log_n, is_causal, scale, dropout_p)


def _kv_run(path, q, k, v, log_n, is_causal, scale, dropout_p, param, kv_bias) -> Tensor:
    return kv_bias_attention(path, q, k, v, *kv_bias, is_causal, scale, dropout_p)


def _chunked_run(kind: str) -> Callable[..., Tensor]:
    def run(path, q, k, v, log_n, is_causal, scale, dropout_p, param, kv_bias) -> Tensor:
        return chunked_attention(kind, q, k, v, param, is_causal, scale)
    return run


def _chunked_choose(q: Tensor, dropout_p: float, cuda_kernel: str) -> str:
    return "chunked" if dropout_p == 0.0 else "reference"  # dropout would need its mask replayed per block


def _check_sigmoid(o: VariantOptions) -> None:
    if o.sigmoid_bias is not None and not math.isfinite(o.sigmoid_bias):
        raise ConfigError(f"sigmoid attention: sigmoid_bias must be a finite number or None (-log T), "
                          f"got {o.sigmoid_bias!r}")


def _diff_weights(scores: Tensor, **_) -> Tensor:
    raise ConfigError("attention variant 'diff' needs its lambda: run it through attention(..., diff_lambda=) or "
                      "QuietAttention, which call nn/diff.py")


def _diff_run(*_args) -> Tensor:
    raise ConfigError("attention variant 'diff' runs through nn/diff.py (attention.py dispatches it)")


SDPA = FastPath(choose=lambda q, dropout_p, cuda_kernel: "sdpa", run=_sdpa)
DIFF = FastPath(choose=lambda q, dropout_p, cuda_kernel: "diff-sdpa" if dropout_p == 0.0 else "reference",
                run=_diff_run)
NULL_LOGIT = FastPath(choose=null_path, run=_null_run)  # an LSE kernel, else the null-key prefix
KV_BIAS = FastPath(choose=kv_bias_path, run=_kv_run)  # the LSE kernels with a per-query null logit; prefix at small T


def _sink_logit(n: float, sink_logit: Tensor | None) -> Tensor:
    if sink_logit is None:
        raise ConfigError("attention variant 'sink' needs sink_logit, a tensor of one logit per head")
    if sink_logit.dim() == 3:  # (B, H, 1): one logit per batch row and head (an ensemble's members)
        return sink_logit
    return sink_logit.reshape(-1, 1)  # (H, 1): broadcasts over (B, H, T)


VARIANT_SPECS: dict[str, Variant] = {
    "softmax": Variant(_softmax_weights, SDPA),
    "softmax1": Variant(_null_weights, NULL_LOGIT, null_logit=lambda n, sink_logit: 0.0, unassigned=True),
    "softmax_n": Variant(_null_weights, NULL_LOGIT, null_logit=lambda n, sink_logit: log_n_of(n),
                         check=lambda o: log_n_of(o.n), options=("n",), config_fields=("softmax_n",),
                         unassigned=True),  # log_n_of raises on bad n
    "sink": Variant(_null_weights, NULL_LOGIT, null_logit=_sink_logit, options=("sink_init",),
                    config_fields=("sink_init",), unassigned=True),
    # the clip zeroes small weights and caps large ones, so a row's sum is not 1 (it may exceed 1 when zeta > 1)
    "clipped": Variant(_clipped_weights, None, no_fast="clipped softmax has no fused form",
                       check=lambda o: check_clip_params(o.gamma, o.zeta), options=("gamma", "zeta"),
                       config_fields=("clip_gamma", "clip_zeta"), unassigned=True),
    "gated": Variant(_softmax_weights, SDPA, config_fields=("gate_init",)),  # the model multiplies each head's
    # output by its gate
    "softpick": Variant(_softpick_weights, FastPath(_chunked_choose, _chunked_run("softpick")),
                        param=lambda o, Tk: SOFTPICK_EPS, unassigned=True, fast_dropout=False),
    "outgate": Variant(_softmax_weights, SDPA, config_fields=("gate_mode",)),  # the model multiplies each
    # head's output by its G1 gate
    "sigmoid": Variant(_sigmoid_weights, FastPath(_chunked_choose, _chunked_run("sigmoid")),
                       param=lambda o, Tk: sigmoid_bias(Tk, o.sigmoid_bias), check=_check_sigmoid,
                       options=("sigmoid_bias",), config_fields=("sigmoid_bias",), unassigned=True,
                       fast_dropout=False),
    "kvbias": Variant(_null_weights, KV_BIAS, unassigned=True),  # its null logit q.k' is computed per query
    # two maps and a learned lambda: attention.py runs it through nn/diff.py (its weights need lambda)
    "diff": Variant(_diff_weights, DIFF, unassigned=True, renormalised=True, fast_dropout=False),
}
VARIANTS = tuple(VARIANT_SPECS)
NULL_VARIANTS = tuple(v for v, s in VARIANT_SPECS.items() if s.unassigned)  # report 1 - row sum
RENORMALISED = tuple(v for v, s in VARIANT_SPECS.items() if s.renormalised)  # that mass is not abstention
LSE_VARIANTS = tuple(v for v, s in VARIANT_SPECS.items()
                     if s.fast is not None and s.fast.choose in (null_path, kv_bias_path))
OPTION_OWNERS = {f: v for v, s in VARIANT_SPECS.items() for f in s.options}  # AttentionOptions field -> variant
VARIANT_FIELDS = {f: v for v, s in VARIANT_SPECS.items() for f in s.config_fields}  # GPTConfig field -> variant


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown attention variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def variant_spec(variant: str) -> Variant:
    """VARIANT_SPECS[variant], or a ConfigError naming the variants there are."""
    check_variant(variant)
    return VARIANT_SPECS[variant]


def null_log_n(variant: str, n: float = 1.0, sink_logit: Tensor | None = None) -> Tensor | float | None:
    """The null entry's logit for `variant`: 0 for softmax1, log n for softmax_n, b_h (as (H, 1) so it
    broadcasts over (B, H, T); a (B, H, 1) sink_logit stays as it is) for sink, None for variants without
    one."""
    spec = VARIANT_SPECS.get(variant)
    if spec is None or spec.null_logit is None:
        return None
    return spec.null_logit(n, sink_logit)
