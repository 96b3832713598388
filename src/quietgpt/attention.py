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
* softmax1 / softmax_n / sink ("null-logit" variants), via the identity
      softmax_n(S) V = softmax(S) V * sigmoid(LSE - log n),   LSE = logsumexp of the row's scores.
  - "lse": a fused kernel that returns its LSE (flash on CPU; cuDNN or flash on CUDA) gives the
    forward. Its backward, handed the adjusted LSE' = logaddexp(LSE, log n) and the adjusted output,
    recomputes exactly the softmax_n
    probabilities exp(S - LSE') and so gives exact gradients (softmax_n's Jacobian has softmax's
    form, P (dP - rowsum(P dP)), because n is a constant). The learned sink's gradient is added on top:
        dL/db = -sum_rows p_null * rowsum(dO * O'),   p_null = exp(b - LSE').
  - "prefix": when no LSE kernel fits (dropout > 0, or a device/dtype without one), SDPA over the keys
    with one null key prepended whose logit is exactly log n and whose value is 0. It is exact, supports
    dropout, and still never forms B x H x T x T scores (only a T x (T+1) boolean mask).
* clipped: the clip breaks the identity above, so it always runs the reference path.

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

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .softmax import check_clip_params, clipped_softmax, log_n_of, softmax_with_null

Tensor = torch.Tensor
log = logging.getLogger(__name__)

VARIANTS = ("softmax", "softmax1", "softmax_n", "sink", "clipped", "gated")
NULL_VARIANTS = ("softmax1", "softmax_n", "sink")  # the ones that can leave mass on "nothing"
PATHS = ("auto", "fast", "reference")
CUDA_KERNELS = ("auto", "flash", "cudnn")  # the CUDA LSE kernel preference; see lse_kernel_for


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown attention variant {variant!r}; choose one of {', '.join(VARIANTS)}")


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
        if self.variant == "softmax_n":
            log_n_of(self.n)  # raises on n < 0 or a non-finite n
        if self.variant == "clipped":
            check_clip_params(self.gamma, self.zeta)
            if self.path == "fast":
                raise ConfigError("attention path 'fast' is not possible here (clipped softmax has no fused form); "
                                  "use path='auto'")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"attention dropout must be in [0, 1), got {self.dropout!r}")


# --------------------------------------------------------------------------------------------------
# Fused kernels that return the row log-sum-exp.  forward -> (out, lse (B,H,T) fp32, aux);
# backward(grad, q, k, v, out, lse, aux) -> (dq, dk, dv).


class _CpuFlash:
    name = "lse-flash-cpu"

    @staticmethod
    def supports(q: Tensor) -> bool:
        return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    @staticmethod
    def forward(q, k, v, is_causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, scale=scale
        )
        return out, lse, ()

    @staticmethod
    def backward(g, q, k, v, out, lse, aux, is_causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, out, lse, 0.0, is_causal, scale=scale
        )


def _cuda_half(q: Tensor, max_head_dim: int) -> bool:
    """q is a CUDA fp16/bf16 tensor whose head dim (a multiple of 8, at most max_head_dim) the fused
    CUDA kernels take."""
    return (
        q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= max_head_dim
    )


@torch.compiler.assume_constant_result
def _flash_ready() -> bool:
    """SDPA's flash backend enabled (evaluated once while compiling: a traced call would break the graph)."""
    return torch.backends.cuda.flash_sdp_enabled()


class _CudaFlash:
    # Flash attention on CUDA: half precision only, head dim a multiple of 8 up to 256.
    name = "lse-flash-cuda"

    @staticmethod
    def supports(q: Tensor) -> bool:
        return _cuda_half(q, 256) and _flash_ready()

    @staticmethod
    def forward(q, k, v, is_causal, scale):
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal, False, scale=scale
        )
        return out, lse, (cq, ck, mq, mk, seed, offset)

    @staticmethod
    def backward(g, q, k, v, out, lse, aux, is_causal, scale):
        cq, ck, mq, mk, seed, offset = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            g, q, k, v, out, lse, cq, ck, mq, mk, 0.0, is_causal, seed, offset, scale=scale
        )


@functools.cache
def _cudnn_capable(index: int) -> bool:
    """This torch's cuDNN attention op returns an LSE (its signature has compute_log_sumexp: torch >= 2.5),
    cuDNN is 9 or newer and device `index` has compute capability 8.0 or more."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    names = {a.name for a in op.default._schema.arguments} if op is not None else set()
    return (
        "compute_log_sumexp" in names
        and (torch.backends.cudnn.version() or 0) >= 90000
        and torch.cuda.get_device_capability(index)[0] >= 8
    )


@torch.compiler.assume_constant_result
def _cudnn_ready(index: int) -> bool:
    """cuDNN attention usable on CUDA device `index` (evaluated once while compiling, not traced)."""
    return torch.backends.cuda.cudnn_sdp_enabled() and _cudnn_capable(index)


class _CudaCudnn:
    # cuDNN's fused attention (cuDNN >= 9, compute capability >= 8.0, half precision, head dim <= 128).
    # On Hopper it is what SDPA itself picks, and much faster than the flash-attention-2 kernel above.
    name = "lse-cudnn-cuda"

    @staticmethod
    def supports(q: Tensor) -> bool:
        return _cuda_half(q, 128) and _cudnn_ready(q.device.index if q.device.index is not None else 0)

    @staticmethod
    def forward(q, k, v, is_causal, scale):
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale
        )
        return out, lse.reshape(lse.shape[:3]), (cq, ck, mq, mk, seed, offset, lse.shape)

    @staticmethod
    def backward(g, q, k, v, out, lse, aux, is_causal, scale):
        cq, ck, mq, mk, seed, offset, lse_shape = aux
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            g, q, k, v, out, lse.reshape(lse_shape), seed, offset, None, cq, ck, mq, mk, 0.0, is_causal,
            scale=scale
        )


_KERNEL_NAMED = {k.name: k for k in (_CpuFlash, _CudaFlash, _CudaCudnn)}


def cuda_kernel_order(preference: str, compiling: bool) -> tuple:
    """The CUDA LSE kernels to try, best first, for AttentionOptions.cuda_kernel `preference`.

    "flash" / "cudnn" pin one kernel. "auto" is cuDNN where it runs (on Hopper it is what SDPA itself
    picks, ~1.6x faster than flash-attention-2), else flash; but under torch.compile always flash. Inside
    a compiled graph the cuDNN op trained wrong (losses 0.14 off eager after 8 steps, torch 2.11 on an
    H200; eager cuDNN and compiled flash both match float32), so compiling never uses it unless asked.
    """
    if preference == "auto" and compiling:
        preference = "flash"
    return {"auto": (_CudaCudnn, _CudaFlash), "flash": (_CudaFlash,), "cudnn": (_CudaCudnn,)}[preference]


def lse_kernel_for(q: Tensor, preference: str = "auto"):
    """The fused LSE kernel that can run `q`'s device and dtype, or None. `preference` (an
    AttentionOptions.cuda_kernel) picks among the CUDA kernels; the CPU has one."""
    if q.device.type == "cpu":
        return _CpuFlash if _CpuFlash.supports(q) else None
    for kern in cuda_kernel_order(preference, torch.compiler.is_compiling()):
        if kern.supports(q):
            return kern
    return None


class _NullLSEAttention(torch.autograd.Function):
    """softmax_n attention from a fused kernel's output and LSE; exact forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, log_n, is_causal, scale, kern):
        out, lse, aux = kern.forward(q, k, v, is_causal, scale)
        ln = log_n.to(lse.dtype)
        lse_adj = torch.logaddexp(lse, ln)
        keep = torch.exp(lse - lse_adj)  # = sigmoid(LSE - log n) = mass kept on real tokens
        out_adj = out * keep.unsqueeze(-1).to(out.dtype)
        ctx.save_for_backward(q, k, v, out_adj, lse_adj, ln)
        ctx.aux, ctx.is_causal, ctx.scale, ctx.kern = aux, is_causal, scale, kern
        ctx.log_n_shape = log_n.shape
        return out_adj

    @staticmethod
    def backward(ctx, g):
        q, k, v, out_adj, lse_adj, ln = ctx.saved_tensors
        if g.stride(-1) != 1:  # the kernels take any layout with a unit last stride (the model's is (B,T,H,D))
            g = g.contiguous()
        dq, dk, dv = ctx.kern.backward(g, q, k, v, out_adj, lse_adj, ctx.aux, ctx.is_causal, ctx.scale)
        d_log_n = None
        if ctx.needs_input_grad[3]:
            p_null = torch.exp(ln - lse_adj)
            row = (g.float() * out_adj.float()).sum(-1)
            d_log_n = (-(p_null * row)).sum_to_size(ctx.log_n_shape)
        return dq, dk, dv, d_log_n, None, None, None


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(value: float, like: Tensor) -> Tensor:
    """A cached 0-d tensor holding a fixed null logit (fp64 for fp64 inputs, else fp32) on like's device:
    building one per call costs more than the few-element math it feeds at small sizes."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if torch.compiler.is_compiling():  # a graph constant costs nothing, and the cache would guard recompiles
        return torch.tensor(value, dtype=dtype, device=like.device)
    key = (value, like.device, dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=like.device)
    return t


def _prefix_attention(q, k, v, log_n: Tensor, is_causal: bool, scale: float, dropout_p: float) -> Tensor:
    """SDPA over [null key; keys] where the null key's logit is exactly log_n and its value is 0.

    The null logit rides on an extra head dimension: q gets a constant 1, real keys a 0 and the null
    key log_n / scale, so scale * q.k_null = log_n. Padding to a multiple of 8 keeps fused kernels usable.
    """
    B, H, T, D = q.shape
    Tk = k.shape[2]
    pad = 8
    ln = (log_n.to(q.dtype) / scale).expand(B, H, 1).unsqueeze(-1)  # (B, H, 1, 1)
    q_aug = torch.cat([q, q.new_ones(B, H, T, 1), q.new_zeros(B, H, T, pad - 1)], dim=-1)
    k_null = torch.cat([k.new_zeros(B, H, 1, D), ln, k.new_zeros(B, H, 1, pad - 1)], dim=-1)
    k_aug = torch.cat([k_null, torch.cat([k, k.new_zeros(B, H, Tk, pad)], dim=-1)], dim=2)
    v_aug = torch.cat([v.new_zeros(B, H, 1, v.shape[-1]), v], dim=2)
    mask = None
    if is_causal:
        mask = torch.ones(T, Tk + 1, dtype=torch.bool, device=q.device).tril(diagonal=1)
        mask[:, 0] = True
    return F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _probabilities(scores: Tensor, variant: str, log_n, gamma: float, zeta: float) -> Tensor:
    """Row-normalised attention weights for the reference path (scores fp32/fp64, masked with -inf)."""
    if variant in NULL_VARIANTS:
        return softmax_with_null(scores, log_n)
    if variant == "clipped":
        return clipped_softmax(scores, gamma, zeta)
    return torch.softmax(scores, dim=-1)


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
    probs = _probabilities(scores, variant, log_n, gamma, zeta)
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
    check_variant(variant)
    check_path(path)
    if path == "reference" or need_probs or variant == "clipped":
        if path == "fast":
            why = "clipped softmax has no fused form" if variant == "clipped" else "probabilities are observed"
            raise ConfigError(f"attention path 'fast' is not possible here ({why}); use path='auto'")
        return "reference"
    if variant in ("softmax", "gated"):
        return "sdpa"
    kern = lse_kernel_for(q, cuda_kernel)
    if kern is not None and dropout_p == 0.0:
        return kern.name
    return "prefix"


def null_log_n(variant: str, n: float = 1.0, sink_logit: Tensor | None = None) -> Tensor | float | None:
    """The null entry's logit for `variant`: 0 for softmax1, log n for softmax_n, b_h (as (H, 1) so it
    broadcasts over (B, H, T)) for sink, None for variants without one."""
    if variant == "softmax1":
        return 0.0
    if variant == "softmax_n":
        return log_n_of(n)
    if variant == "sink":
        if sink_logit is None:
            raise ConfigError("attention variant 'sink' needs sink_logit, a tensor of one logit per head")
        return sink_logit.reshape(-1, 1)
    return None


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
    if variant == "softmax_n" and log_n == -math.inf:
        variant = "softmax"  # n = 0 is ordinary softmax, and SDPA is its fast path
    chosen = select_path(variant, opts.path, q, dropout_p, need_probs=probs_hook is not None,
                         cuda_kernel=opts.cuda_kernel)
    if chosen == "reference":
        out = reference_attention(q, k, v, variant, is_causal=is_causal, log_n=log_n, gamma=opts.gamma,
                                  zeta=opts.zeta, dropout_p=dropout_p, scale=scale, probs_hook=probs_hook)
    elif chosen == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    else:
        ln = log_n if isinstance(log_n, Tensor) else _constant(log_n, q)
        if chosen == "prefix":
            out = _prefix_attention(q, k, v, ln, is_causal, scale, dropout_p)
        else:
            # the kernel select_path just chose, by name: no second round of support checks
            out = _NullLSEAttention.apply(q, k, v, ln, is_causal, scale, _KERNEL_NAMED[chosen])
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
