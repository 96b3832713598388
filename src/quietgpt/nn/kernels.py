"""Fused attention kernels that return their log-sum-exp, and the exact softmax_n paths built on them.

The null-logit variants (softmax1, softmax_n, sink) rest on one identity:

    softmax_n(S) V = softmax(S) V * sigmoid(LSE - log n),   LSE = logsumexp of the row's scores,

so a fused softmax-attention kernel that also returns LSE gives their output without ever forming the
T x T scores. Two exact paths follow (`null_path` picks one, `null_attention` runs it):

* "lse-flash-cpu" / "lse-cudnn-cuda" / "lse-flash-cuda": a fused kernel that returns its LSE (flash on
  CPU; cuDNN or flash on CUDA, see `cuda_kernel_order`) gives the forward. Its backward, handed the
  adjusted LSE' = logaddexp(LSE, log n) and the adjusted output, recomputes exactly the softmax_n
  probabilities exp(S - LSE') and so gives exact gradients (softmax_n's Jacobian has softmax's form,
  P (dP - rowsum(P dP)), because n is a constant). The learned sink's gradient is added on top:
      dL/db = -sum_rows p_null * rowsum(dO * O'),   p_null = exp(b - LSE').
* "prefix": when no LSE kernel fits (dropout > 0, or a device/dtype without one), SDPA over the keys
  with one null key prepended whose logit is exactly log n and whose value is 0. It is exact, supports
  dropout, and still never forms B x H x T x T scores (only a T x (T+1) boolean mask).

The key/value bias ("kvbias", Sun et al. 2024) is softmax attention over [k'; keys] and [v'; values], one
learned key k' and value v' per head, so its null logit s' = scale q.k' depends on the query. The same
identity gives it exactly and cheaply: with LSE' = logaddexp(LSE, s'),

    out = softmax(S) V * exp(LSE - LSE') + exp(s' - LSE') v'

and the kernel's backward, handed LSE' and this output, gives dq, dk, dv of every real key (its
rowsum(dO * O) term is the full row's); the bias column adds its own dS' = p' (dO.v' - rowsum(dO * O)),
so dq += scale dS' k', dk' = scale sum_rows dS' q, dv' = sum_rows p' dO. Without an LSE kernel (or with
dropout) it is SDPA over [k'; keys] itself, column 0 visible to every query (Sun et al.'s own code); on
the CPU also up to KV_PREFIX_MAX_T_CPU queries, where that measured faster (`kv_bias_path` picks).

A kernel is a class with `name`, `supports(q)`, `forward(q, k, v, is_causal, scale) -> (out, lse (B,H,T)
fp32, aux)` and `backward(grad, q, k, v, out, lse, aux, is_causal, scale) -> (dq, dk, dv)`. This module
imports nothing of quietgpt (only torch): variants.py builds each variant's fast path on it, and it knows
nothing of variants or options.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

CUDA_KERNELS = ("auto", "flash", "cudnn")  # the CUDA LSE kernel preference; see lse_kernel_for


# --------------------------------------------------------------------------------------------------
# Fused kernels that return the row log-sum-exp.


class _CpuFlash:
    name = "lse-flash-cpu"

    @staticmethod
    def supports(q: Tensor) -> bool:
        return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    @staticmethod
    def forward(q, k, v, is_causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
            q, k, v, 0.0, is_causal, scale=scale
        )
        return out, lse, ()

    @staticmethod
    def backward(g, q, k, v, out, lse, aux, is_causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
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


# softplus(z) returns z itself above `threshold`, off by log1p(exp(-z)) < exp(-threshold): below half an ulp
# of z there in the LSE's dtype (fp32 for every kernel but fp64's), so LSE' stays exact.
_SOFTPLUS_THRESHOLD = {torch.float64: 40.0}


def _null_adjust(lse: Tensor, log_n: Tensor | float, with_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """(keep, LSE') for null logit log_n: keep = sigmoid(LSE - log n), the mass softmax_n leaves on the real
    keys, and LSE' = logaddexp(LSE, log n) = log n + softplus(LSE - log n), the row's full log-sum-exp (only
    the backward needs it: None unless with_lse). Few ops on purpose: at small T their fixed cost is most
    of what the path adds to SDPA."""
    zero = isinstance(log_n, float) and log_n == 0.0
    z = lse if zero else lse - log_n
    keep = torch.sigmoid(z)
    if not with_lse:
        return keep, None
    soft = F.softplus(z, threshold=_SOFTPLUS_THRESHOLD.get(lse.dtype, 20.0))
    return keep, soft if zero else soft + log_n


def _kernel_backward(ctx, g: Tensor, q: Tensor, k: Tensor, v: Tensor, out_adj: Tensor, lse_adj: Tensor):
    """The kernel's own backward handed the adjusted output and LSE' (see the module docstring): dq, dk, dv
    of the real keys. ctx holds the kernel, its aux tensors, is_causal and scale from the forward."""
    if g.stride(-1) != 1:  # the kernels take any layout with a unit last stride (the model's is (B,T,H,D))
        g = g.contiguous()
    return ctx.kern.backward(g, q, k, v, out_adj, lse_adj, ctx.aux, ctx.is_causal, ctx.scale)


def _stash(ctx, aux, is_causal: bool, scale: float, kern) -> None:
    ctx.aux, ctx.is_causal, ctx.scale, ctx.kern = aux, is_causal, scale, kern


class _NullLSEAttention(torch.autograd.Function):
    """softmax_n attention from a fused kernel's output and LSE; exact forward and backward. log_n is a
    float (softmax1, softmax_n) or a tensor broadcasting over (B, H, T) (the sink's learned (H, 1))."""

    @staticmethod
    def forward(ctx, q, k, v, log_n, is_causal, scale, kern):
        out, lse, aux = kern.forward(q, k, v, is_causal, scale)
        keep, lse_adj = _null_adjust(lse, log_n)
        out_adj = out.mul_(keep.unsqueeze(-1))  # in place: out is the kernel's own fresh tensor
        # a learned null logit's gradient needs p_null = exp(log n - LSE') = sigmoid(log n - LSE), formed
        # here from LSE (1 - keep would lose its relative precision where it is small)
        p_null = torch.sigmoid(log_n - lse) if isinstance(log_n, Tensor) and log_n.requires_grad else None
        ctx.save_for_backward(q, k, v, out_adj, lse_adj, p_null)
        _stash(ctx, aux, is_causal, scale, kern)
        ctx.log_n_shape = log_n.shape if isinstance(log_n, Tensor) else None
        return out_adj

    @staticmethod
    def backward(ctx, g):
        q, k, v, out_adj, lse_adj, p_null = ctx.saved_tensors
        dq, dk, dv = _kernel_backward(ctx, g, q, k, v, out_adj, lse_adj)
        d_log_n = None
        if ctx.needs_input_grad[3]:  # dL/db = -sum_rows p_null * rowsum(dO * O')
            cd = lse_adj.dtype  # fp32 for half inputs, fp64 for fp64 ones (fp32 here cost fp64 runs 1e-7)
            row = torch.linalg.vecdot(g.to(cd), out_adj.to(cd))
            d_log_n = (p_null * row).sum_to_size(ctx.log_n_shape).neg_()
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


def _kv_adjust(out: Tensor, lse: Tensor, q: Tensor, k_b: Tensor, v_b: Tensor, scale: float):
    """(out', LSE', p') for the key/value bias: with s' = scale q.k' the bias key's logit per query,
    LSE' = logaddexp(LSE, s'), p' = exp(s' - LSE') its weight and out' = out exp(LSE - LSE') + p' v'."""
    cd = lse.dtype
    s_b = torch.linalg.vecdot(q.to(cd), k_b.to(cd).unsqueeze(-2)) * scale
    lse_adj = torch.logaddexp(lse, s_b)
    p_b = torch.exp(s_b - lse_adj)
    keep = torch.exp(lse - lse_adj).unsqueeze(-1)
    # out * keep + p' v' (a rank-one term per head), in the compute dtype
    out_adj = torch.addcmul(out.to(cd) * keep, p_b.unsqueeze(-1), v_b.to(cd).unsqueeze(-2)).to(out.dtype)
    return out_adj, lse_adj, p_b


class _KVBiasLSEAttention(torch.autograd.Function):
    """Softmax attention over [k'; keys], [v'; values] from a fused kernel's output and LSE; exact forward
    and backward (the module docstring derives both). k_b, v_b: (H, D) and (H, Dv) shared by every batch row,
    or (B, H, D) and (B, H, Dv), one per row (an ensemble's members)."""

    @staticmethod
    def forward(ctx, q, k, v, k_b, v_b, is_causal, scale, kern):
        out, lse, aux = kern.forward(q, k, v, is_causal, scale)
        out_adj, lse_adj, p_b = _kv_adjust(out, lse, q, k_b, v_b, scale)
        ctx.save_for_backward(q, k, v, k_b, v_b, out_adj, lse_adj, p_b)
        _stash(ctx, aux, is_causal, scale, kern)
        return out_adj

    @staticmethod
    def backward(ctx, g):
        q, k, v, k_b, v_b, out_adj, lse_adj, p_b = ctx.saved_tensors
        dq, dk, dv = _kernel_backward(ctx, g, q, k, v, out_adj, lse_adj)
        cd = p_b.dtype
        gc = g.to(cd)
        rowsum = torch.linalg.vecdot(gc, out_adj.to(cd))  # the full row's rowsum(dO * O), as the kernel's
        ds_b = p_b * (torch.linalg.vecdot(gc, v_b.to(cd).unsqueeze(-2)) - rowsum)
        dq = dq.addcmul_(ds_b.unsqueeze(-1).to(dq.dtype), k_b.to(dq.dtype).unsqueeze(-2), value=ctx.scale)
        # per row (B, H, D), then summed over the rows a shared (H, D) bias serves
        dk_b = (ctx.scale * (ds_b.unsqueeze(-2) @ q.to(cd)).squeeze(-2)).sum_to_size(k_b.shape).to(k_b.dtype)
        dv_b = (p_b.unsqueeze(-2) @ gc).squeeze(-2).sum_to_size(v_b.shape).to(v_b.dtype)
        return dq, dk, dv, dk_b, dv_b, None, None, None


def _prefix_mask(T: int, Tk: int, device) -> Tensor:
    """Causal (T, Tk + 1) boolean mask whose column 0, a prepended key, every query sees."""
    mask = torch.ones(T, Tk + 1, dtype=torch.bool, device=device).tril(diagonal=1)
    mask[:, 0] = True
    return mask


def _kv_prefix_attention(q, k, v, k_b: Tensor, v_b: Tensor, is_causal: bool, scale: float,
                         dropout_p: float) -> Tensor:
    """SDPA over [k'; keys] and [v'; values]: the key/value bias as Sun et al.'s code computes it."""
    B, H, T, _ = q.shape
    k_aug = torch.cat([k_b.to(k.dtype).unsqueeze(-2).expand(B, H, 1, -1), k], dim=2)
    v_aug = torch.cat([v_b.to(v.dtype).unsqueeze(-2).expand(B, H, 1, -1), v], dim=2)
    mask = _prefix_mask(T, k.shape[2], q.device) if is_causal else None
    return F.scaled_dot_product_attention(q, k_aug, v_aug, attn_mask=mask, dropout_p=dropout_p, scale=scale)


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
    mask = _prefix_mask(T, Tk, q.device) if is_causal else None
    return F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# --------------------------------------------------------------------------------------------------
# The exact softmax_n paths: which one runs, and running it.


def null_path(q: Tensor, dropout_p: float, cuda_kernel: str = "auto") -> str:
    """The softmax_n path for `q`: the name of the LSE kernel that runs its device and dtype (preference
    `cuda_kernel`), or "prefix" when there is none or dropout is on."""
    kern = lse_kernel_for(q, cuda_kernel)
    if kern is not None and dropout_p == 0.0:
        return kern.name
    return "prefix"


def _grad_needed(*xs) -> bool:
    """Whether autograd would record a graph through any of the tensors among xs."""
    return torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in xs)


# Up to this many queries the key/value bias is faster on the CPU as SDPA over [k'; keys] ("prefix") than on
# the LSE kernel, whose adjustment (a dozen small ops each way) is a fixed cost the one extra key is not:
# `python benchmarks/attention.py --T 64 --T 128 --T 256 --T 512 --B 12 --H 4 --D 32 --prefix --variants
# kvbias` (fwd+bwd, 2 threads) gave prefix 1.31 / 1.18 / 1.10 / 1.09x SDPA, LSE 1.60 / 1.33 / 1.17 / 1.06x.
# The null-logit variants keep the LSE kernel at every T: their prefix path was 1.6x at T = 64 (same command).
KV_PREFIX_MAX_T_CPU = 256


def kv_bias_path(q: Tensor, dropout_p: float, cuda_kernel: str = "auto") -> str:
    """The key/value bias's path for `q`: null_path's, except "prefix" for the CPU kernel at small T (the
    faster exact path there, by measurement: KV_PREFIX_MAX_T_CPU)."""
    path = null_path(q, dropout_p, cuda_kernel)
    if path == _CpuFlash.name and q.shape[-2] <= KV_PREFIX_MAX_T_CPU:
        return "prefix"
    return path


def null_attention(path: str, q: Tensor, k: Tensor, v: Tensor, log_n: Tensor | float, is_causal: bool,
                   scale: float, dropout_p: float) -> Tensor:
    """softmax_n attention with null logit `log_n` (a float, (H, 1) per head, or (B, H, 1) per batch row and
    head) on `path`, a name `null_path` returned: no second round of support checks."""
    if path == "prefix":
        ln = log_n if isinstance(log_n, Tensor) else _constant(log_n, q)
        return _prefix_attention(q, k, v, ln, is_causal, scale, dropout_p)
    kern = _KERNEL_NAMED[path]
    log_n = log_n if isinstance(log_n, Tensor) else float(log_n)
    if not _grad_needed(q, k, v, log_n):  # evaluation, measurement, sampling: no autograd node to build
        out, lse, _ = kern.forward(q, k, v, is_causal, scale)
        return out.mul_(_null_adjust(lse, log_n, with_lse=False)[0].unsqueeze(-1))
    return _NullLSEAttention.apply(q, k, v, log_n, is_causal, scale, kern)


def kv_bias_attention(path: str, q: Tensor, k: Tensor, v: Tensor, k_b: Tensor, v_b: Tensor, is_causal: bool,
                      scale: float, dropout_p: float) -> Tensor:
    """Softmax attention over [k'; keys], [v'; values] (k_b (H, D), v_b (H, Dv), learned per head; or
    (B, H, D), (B, H, Dv), one per batch row) on `path`, a name `kv_bias_path` returned: an LSE kernel's, or
    "prefix"."""
    if path == "prefix":
        return _kv_prefix_attention(q, k, v, k_b, v_b, is_causal, scale, dropout_p)
    kern = _KERNEL_NAMED[path]
    if not _grad_needed(q, k, v, k_b, v_b):
        out, lse, _ = kern.forward(q, k, v, is_causal, scale)
        return _kv_adjust(out, lse, q, k_b, v_b, scale)[0]
    return _KVBiasLSEAttention.apply(q, k, v, k_b, v_b, is_causal, scale, kern)
