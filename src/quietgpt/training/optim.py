"""The optimizer as a variable: `train.optimizer` = adamw | muon | orthoadam, or one of pytorch-optimizer's.

Kaul et al. (ICLR 2025, "From Attention to Activation") trace outlier activations to Adam's
per-coordinate scaling and remove them with OrthoAdam; Park et al. 2025 ("Outlier-Safe Pre-Training")
remove them with Muon. So the optimizer is a study axis like the attention variant:

* adamw      nanoGPT's fused AdamW with decay/no-decay groups (the default, unchanged).
* muon       PyTorch's own `torch.optim.Muon` (Newton-Schulz orthogonalised momentum) for the hidden
             matmul weights (`muon_params`: every block's BLOCK_MATMULS and the outgate variant's (out, C)
             gate projection), at `train.muon_lr` with Keller Jordan's shape scaling (adjust_lr_fn
             "original"), momentum `train.muon_momentum`, Nesterov; AdamW (the groups above) for the rest:
             embeddings, the tied head, LayerNorm gains and biases, linear biases, sink logits, kvbias's
             learned key and value vectors and the gated variant's per-head gate vectors (Keller Jordan's
             rule, as Muon's authors and modded-nanogpt apply it: Newton-Schulz would orthogonalise those
             vectors across heads).
* orthoadam  Adam whose moments live in a fixed random orthogonal basis per parameter (Kaul et al.):
             gradients are rotated in, the Adam direction is rotated back. Each tensor axis of size
             <= `train.orthoadam_max_dim` gets its own Haar-random orthogonal matrix (the basis of the
             flattened tensor is their Kronecker product, which is orthogonal and stores only small
             matrices); larger axes (a GPT-2 vocabulary) stay unrotated. With every Q = I it is AdamW
             exactly (a test).

* soap, shampoo, lion, lib:<name>  the pytorch-optimizer library's (config.LIBRARY_OPTIMIZERS says which class
             and why each default): over the decay/no-decay groups, at the scheduled rate times the
             optimizer's lr_scale, weight decay train.weight_decay times its wd_scale, every other option the
             library's default or train.optimizer_args'. The library is written and tested by others; quietgpt
             only wires it (tests/test_optim.py holds the wiring against the library driven by hand).

The learning-rate schedule scales every group: a group's `lr_scale` (Muon's muon_lr / learning_rate)
multiplies the scheduled rate (training/step.py), so warmup and decay apply to both optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from quietgpt.config import OPTIMIZERS, TrainConfig, library_optimizer
from quietgpt.nn.model import is_block_matmul

__all__ = ["OPTIMIZERS", "Chained", "Muon", "OrthoAdam", "build_optimizer", "haar_orthogonal", "muon_params",
           "newton_schulz", "rotate"]


def build_optimizer(model, tc: TrainConfig, device_type: str) -> torch.optim.Optimizer | Chained:
    """The optimizer tc.optimizer names, over `model` (a quietgpt GPT) at tc.learning_rate."""
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "adamw":
        return model.configure_optimizers(tc.weight_decay, tc.learning_rate, betas, device_type)
    if tc.optimizer == "orthoadam":
        return OrthoAdam(model.param_groups(tc.weight_decay), lr=tc.learning_rate, betas=betas,
                         max_rotate_dim=tc.orthoadam_max_dim, seed=tc.seed)
    if tc.optimizer not in OPTIMIZERS:
        return build_library_optimizer(model, tc)
    hidden = {id(p) for _, p in muon_params(model)}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]}
            for g in model.param_groups(tc.weight_decay)]
    muon = Muon([p for p in model.parameters() if id(p) in hidden], lr=tc.muon_lr, weight_decay=tc.weight_decay,
                momentum=tc.muon_momentum, nesterov=True, adjust_lr_fn="original",
                ns_dtype=None if device_type == "cuda" else torch.float32)
    for g in muon.param_groups:
        g["lr_scale"] = tc.muon_lr / tc.learning_rate  # the schedule moves Muon's rate in proportion
    adamw = torch.optim.AdamW([g for g in rest if g["params"]], lr=tc.learning_rate, betas=betas)
    return Chained([muon, adamw])


def build_library_optimizer(model, tc: TrainConfig) -> torch.optim.Optimizer:
    """pytorch-optimizer's tc.optimizer over the model's decay/no-decay groups (see the module docstring)."""
    cls, spec = library_optimizer(tc.optimizer)
    args = dict(tc.optimizer_args)
    lr_scale, wd_scale = float(args.pop("lr_scale", spec.lr_scale)), float(args.pop("wd_scale", spec.wd_scale))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}  # TOML arrays: betas
    groups = model.param_groups(tc.weight_decay * wd_scale)
    for g in groups:
        g["lr_scale"] = lr_scale
    return cls(groups, lr=tc.learning_rate * lr_scale, **args)


def muon_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the hidden matmul weights Muon takes: every block's BLOCK_MATMULS weights, the
    outgate variant's gate projection (a matmul over the whole block input, like q_proj's columns it comes
    from in Qiu et al.) and OSP's embedding projections (C x C; OSP trains them with Muon); nothing else."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and
            (is_block_matmul(n) or (n.endswith(".attn.gate.weight") and model.config.attention == "outgate")
             or n in ("emb_proj.weight", "head_proj.weight"))]


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iteration runs in `ns_dtype` (None: torch's own, bfloat16).

    Everything else is torch's step operation for operation (momentum lerp, Nesterov, the quintic iteration and
    its coefficients, decoupled weight decay, the shape scaling); with ns_dtype None it is torch.optim.Muon
    exactly (a test). On a CPU without fast bfloat16 matmuls the five iterations' bfloat16 products are most
    of a step's time (`python benchmarks/train_step.py --optimizers adamw,muon`): build_optimizer runs them in
    float32 there, and keeps bfloat16 on CUDA."""

    def __init__(self, params, *, ns_dtype: torch.dtype | None = None, **kw):
        super().__init__(params, **kw)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype is None:
            return super().step(closure)
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            todo: dict[tuple, list] = {}  # same-shaped matrices run their iterations as one batched matmul
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - mom)
                todo.setdefault(tuple(p.shape), []).append((p, p.grad.lerp(buf, mom) if group["nesterov"] else buf))
            for shape, items in todo.items():
                updates = newton_schulz(torch.stack([u for _, u in items]), group["ns_coefficients"],
                                        group["ns_steps"], group["eps"], self.ns_dtype)
                step = torch.optim._muon._adjust_lr(lr, group["adjust_lr_fn"], torch.Size(shape))
                for (p, _), u in zip(items, updates, strict=True):
                    p.mul_(1 - lr * wd)
                    p.add_(u.to(p.dtype), alpha=-step)
        return loss


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch.optim._muon's quintic Newton-Schulz iteration (Keller Jordan's) in `dtype` instead of bfloat16, on
    one matrix (m, n) or a stack of same-shaped ones (k, m, n), each normalised by its own Frobenius norm."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a) if x.dim() == 3 else \
            torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Chained:
    """Several optimizers stepped as one (Muon for the hidden matrices, AdamW for the rest): their param
    groups are this one's (the schedule sets each group's lr), state_dict() holds each one's. It has
    what train_step and torch.amp.GradScaler use of an optimizer: param_groups, step, zero_grad."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"chained": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("chained")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError("the saved optimizer state is not this optimizer's (another train.optimizer?)")
        for o, s in zip(self.optimizers, states, strict=True):
            o.load_state_dict(s)


def haar_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An n x n Haar-distributed random orthogonal matrix (QR of a float64 Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(dtype)


def rotate(x: torch.Tensor, qs: Sequence[torch.Tensor | None], transpose: bool = False) -> torch.Tensor:
    """Apply Q_i (or Q_i^T) along each axis i of x with a matrix; None axes are left as they are. On the
    flattened (row-major) tensor this is the Kronecker product of the Q_i, an orthogonal map."""
    for i, q in enumerate(qs):
        if q is not None:
            moved = x.movedim(i, 0)
            flat = (q.t() if transpose else q) @ moved.reshape(moved.shape[0], -1)
            x = flat.reshape(moved.shape).movedim(0, i)
    return x


class OrthoAdam(torch.optim.Optimizer):
    """AdamW with its moments in a fixed random orthogonal basis per parameter (Kaul et al. 2025).

    Per step, for a parameter p with gradient g and basis Q (see `rotate`): g' = Q g; Adam's moments and
    bias-corrected direction u' are computed on g' exactly as torch.optim.AdamW computes them; the update
    is Q^T u'. Decoupled weight decay acts on p itself, as in AdamW (it commutes with the rotation).
    The bases are drawn from `seed` and the parameter's position, so a resumed run redraws the same ones.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, max_rotate_dim: int = 4096, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.bases: dict[int, list[torch.Tensor | None]] = {}
        g = torch.Generator().manual_seed(int(seed) % 2**63)
        for p in (p for group in self.param_groups for p in group["params"]):
            self.bases[id(p)] = [haar_orthogonal(n, g).to(p.device) if 1 < n <= max_rotate_dim else None
                                 for n in p.shape]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                qs = self.bases[id(p)]
                grad = p.grad if p.grad.dtype in (torch.float32, torch.float64) else p.grad.float()
                grad = rotate(grad, [q.to(grad.dtype) if q is not None else None for q in qs])
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(grad)
                    st["exp_avg_sq"] = torch.zeros_like(grad)
                st["step"] += 1
                step = float(st["step"])
                # torch.optim.AdamW's single-tensor update, operation for operation (so Q = I is AdamW)
                p.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(grad, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                if all(q is None for q in qs):
                    p.addcdiv_(st["exp_avg"], denom, value=-step_size)
                else:
                    back = rotate(st["exp_avg"] / denom, [q.to(grad.dtype) if q is not None else None for q in qs],
                                  transpose=True)
                    p.add_(back.to(p.dtype), alpha=-step_size)
        return loss
