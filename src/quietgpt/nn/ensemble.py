"""An ensemble: S GPTs of one architecture (one attention variant, S seeds) trained as one model whose every
parameter carries a leading member dimension, so S small matmuls become one batched matmul.

`EnsembleGPT(members)` stacks the members' parameters into (S, ...) tensors and then makes every member's own
parameter a view of its slice: the members stay ordinary GPTs (their optimizers, clipping, evaluation,
measurement and checkpoints are a solo run's, unchanged), while the ensemble's forward runs all of them at
once. The forward follows GPT.forward with the S members' batches side by side in the batch dimension
(S * B rows, member-major):

    embeddings     member s's rows gather from member s's tables
    linear layers  torch.baddbmm over the member dimension ((S, B*T, in) @ (S, in, out))
    norms          normalised over the channels as the member's norm does (LayerNorm, RMSNorm, single-scale
                   RMSNorm, QK-norm), then each member's gain (and bias)
    attention      every variant's core runs unchanged on the (S * B, H, T, D) batch (every fused kernel and
                   exact path), a sink's logits, kvbias's key and value and diff's lambda expanded to one per
                   batch row
    loss           each member's own mean cross-entropy; their sum is what backward differentiates, so each
                   member's gradient is its solo gradient

What it refuses (a one-line ConfigError naming why): dropout (a solo run's dropout masks come from its own
stream, which batched members cannot reproduce), and members that differ in anything but their weights.
The Block, attention and MLP modules are the model's own (model.py): only their parameterised leaves are
replaced, so a change to the block's wiring reaches the ensemble; a new kind of leaf needs its member form
here (MEMBER_FORMS).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quietgpt.errors import ConfigError
from quietgpt.nn.attention import QuietAttention, _attention
from quietgpt.nn.diff import DiffParams, diff_lambda
from quietgpt.nn.gates import HeadGate, OutputGate
from quietgpt.nn.model import GPT
from quietgpt.nn.norms import QKNorm, SingleScaleRMSNorm

Tensor = torch.Tensor


def _stack(tensors: Sequence[Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).contiguous())


class MemberLinear(nn.Module):
    """S nn.Linear layers: weight (S, out, in), bias (S, out) or None; input (S * B, ..., in)."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.S = len(layers)
        self.weight = _stack([m.weight for m in layers])
        self.bias = _stack([m.bias for m in layers]) if layers[0].bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xs = x.reshape(self.S, -1, shape[-1])
        w = self.weight.transpose(1, 2)
        y = torch.baddbmm(self.bias.unsqueeze(1), xs, w) if self.bias is not None else torch.bmm(xs, w)
        return y.reshape(*shape[:-1], y.shape[-1])


class MemberLayerNorm(nn.Module):
    """S nn.LayerNorm layers: gain and bias (S, C); normalisation as nn.LayerNorm, then each member's affine."""

    def __init__(self, layers: Sequence[nn.LayerNorm]):
        super().__init__()
        self.S, self.eps = len(layers), layers[0].eps
        self.weight = _stack([m.weight for m in layers])
        self.bias = _stack([m.bias for m in layers]) if layers[0].bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = F.layer_norm(x, shape[-1:], eps=self.eps).reshape(self.S, -1, shape[-1]) * self.weight.unsqueeze(1)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return y.reshape(shape)


class MemberRMSNorm(nn.Module):
    """S nn.RMSNorm, SingleScaleRMSNorm or QKNorm layers: gain (S, C) or (S,) for the single-scale one;
    input (S * B, ..., C), member-major. Each normalises as its solo layer does, then each member's gain."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.S, self.kind, self.eps = len(layers), type(layers[0]), layers[0].eps
        self.weight = _stack([m.weight for m in layers])

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if self.kind is QKNorm:  # He et al.'s: eps added to the RMS
            y = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)
        else:
            y = torch.rms_norm(x, shape[-1:], eps=self.eps)
        gain = self.weight.view(self.S, 1, -1)  # (S, 1, C) or (S, 1, 1)
        return (y.reshape(self.S, -1, shape[-1]) * gain).reshape(shape)


class MemberDiff(nn.Module):
    """S DiffParams (the diff variant): lambda vectors (S, head_dim / 2), the sub-layer norm's gain (S, head_dim)."""

    def __init__(self, diffs: Sequence[DiffParams]):
        super().__init__()
        self.S, self.init = len(diffs), diffs[0].init
        for name in ("lq1", "lk1", "lq2", "lk2"):
            setattr(self, name, _stack([getattr(d, name) for d in diffs]))
        self.subln = MemberRMSNorm([d.subln for d in diffs])

    def lam(self, rows: int) -> Tensor:
        """Each member's lambda, repeated for its `rows` batch rows: (S * rows,)."""
        return diff_lambda(self.lq1, self.lk1, self.lq2, self.lk2, self.init).repeat_interleave(rows)

    def finish(self, out: Tensor) -> Tensor:
        return self.subln(out) * (1.0 - self.init)


class MemberEmbedding(nn.Module):
    """S nn.Embedding tables (S, V, C); ids (S * B, T), member-major."""

    def __init__(self, layers: Sequence[nn.Embedding]):
        super().__init__()
        self.S = len(layers)
        self.weight = _stack([m.weight for m in layers])

    def forward(self, idx: Tensor) -> Tensor:
        S, V, C = self.weight.shape
        offset = torch.arange(S, device=idx.device).view(S, 1) * V
        flat = idx.reshape(S, -1) + offset
        return F.embedding(flat, self.weight.reshape(S * V, C)).reshape(*idx.shape, C)

    def positions(self, T: int, rows: int) -> Tensor:
        """The first T rows of each member's table, repeated for its `rows` batch rows: (S * rows, T, C)."""
        return self.weight[:, :T].repeat_interleave(rows, dim=0)


class MemberHeadGate(nn.Module):
    """S HeadGates (the gated variant): weight (S, H, head_dim), bias (S, H)."""

    def __init__(self, gates: Sequence[HeadGate]):
        super().__init__()
        self.S, self.n_head, self.head_dim = len(gates), gates[0].n_head, gates[0].head_dim
        self.weight = _stack([g.weight for g in gates])
        self.bias = _stack([g.bias for g in gates])

    def forward(self, x: Tensor) -> Tensor:
        """x (S * B, T, C) -> gate values (S * B, H, T, 1), as HeadGate."""
        N, T, _ = x.shape
        xs = x.view(self.S, N // self.S, T, self.n_head, self.head_dim)
        logits = torch.einsum("sbthd,shd->sbht", xs, self.weight) + self.bias.view(self.S, 1, -1, 1)
        return torch.sigmoid(logits).reshape(N, self.n_head, T).unsqueeze(-1)


class MemberOutputGate(nn.Module):
    """S OutputGates (the outgate variant): weight (S, width, C) or None (constant mode), bias (S, width)."""

    def __init__(self, gates: Sequence[OutputGate]):
        super().__init__()
        g0 = gates[0]
        self.S, self.n_head, self.mode = len(gates), g0.n_head, g0.mode
        self.weight = _stack([g.weight for g in gates]) if g0.weight is not None else None
        self.bias = _stack([g.bias for g in gates]) if g0.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """x (S * B, T, C) -> gate values as OutputGate: (S * B, H, T, head_dim | 1), or (S * B, H, 1, 1)."""
        N, T, _ = x.shape
        if self.weight is None:
            return torch.sigmoid(self.bias).repeat_interleave(N // self.S, dim=0).view(N, -1, 1, 1)
        xs = x.reshape(self.S, -1, x.shape[-1])
        w = self.weight.transpose(1, 2)
        y = torch.baddbmm(self.bias.unsqueeze(1), xs, w) if self.bias is not None else torch.bmm(xs, w)
        return torch.sigmoid(y.reshape(N, T, self.n_head, -1)).transpose(1, 2)


class MemberQuietAttention(nn.Module):
    """S QuietAttention cores: the same options, each member's sink logits (S, H) or key/value bias (S, H, D)
    expanded to one per batch row; the core itself (every path) runs on the (S * B, ...) batch."""

    def __init__(self, cores: Sequence[QuietAttention]):
        super().__init__()
        c0 = cores[0]
        self.S, self.opts = len(cores), c0.opts
        self.sink_logit = _stack([c.sink_logit for c in cores]) if c0.sink_logit is not None else None
        self.k_bias = _stack([c.k_bias for c in cores]) if c0.k_bias is not None else None
        self.v_bias = _stack([c.v_bias for c in cores]) if c0.v_bias is not None else None
        self.diff = MemberDiff([c.diff for c in cores]) if c0.diff is not None else None
        self.tap_probs = nn.Identity()
        self.last_path: str | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None = None) -> Tensor:
        rows = q.shape[0] // self.S
        sink = self.sink_logit.repeat_interleave(rows, 0).unsqueeze(-1) if self.sink_logit is not None else None
        kv = ((self.k_bias.repeat_interleave(rows, 0), self.v_bias.repeat_interleave(rows, 0))
              if self.k_bias is not None else None)
        lam = self.diff.lam(rows) if self.diff is not None else None
        out, self.last_path = _attention(q, k, v, self.opts, sink_logit=sink, gate=gate, training=self.training,
                                         kv_bias=kv, diff_lambda=lam)
        return self.diff.finish(out) if self.diff is not None else out


MEMBER_FORMS = ((nn.Linear, MemberLinear), (nn.LayerNorm, MemberLayerNorm), (nn.Embedding, MemberEmbedding),
                (nn.RMSNorm, MemberRMSNorm), (SingleScaleRMSNorm, MemberRMSNorm), (QKNorm, MemberRMSNorm),
                (HeadGate, MemberHeadGate), (OutputGate, MemberOutputGate), (QuietAttention, MemberQuietAttention))


def _member_form(modules: Sequence[nn.Module]) -> nn.Module | None:
    for kind, form in MEMBER_FORMS:
        if isinstance(modules[0], kind):
            return form(modules)
    return None


def check_members(members: Sequence[GPT]) -> None:
    """One-line ConfigError unless the members can be one ensemble: at least one, the same config, no dropout."""
    if not members:
        raise ConfigError("an ensemble needs at least one member")
    cfg = members[0].config
    if any(m.config != cfg for m in members):
        raise ConfigError("ensemble members must share one model config (they differ only in their seed)")
    if cfg.dropout > 0:
        raise ConfigError("an ensemble cannot train with dropout (model.dropout > 0): each solo run draws its "
                          "dropout masks from its own stream; set model.dropout=0 or train the seeds one by one")


class EnsembleGPT(nn.Module):
    """S GPTs (`members`, same config) as one model with member-stacked parameters; afterwards each member's
    parameters are views of its slice (so they see every update the ensemble's optimizers make)."""

    def __init__(self, members: Sequence[GPT]):
        super().__init__()
        check_members(members)
        self.S, self.config = len(members), members[0].config
        shell = copy.deepcopy(members[0])
        self._replace(shell, list(members))
        self.transformer, self.lm_head, self.tap_embeddings = shell.transformer, shell.lm_head, shell.tap_embeddings
        self.emb_proj, self.head_proj = shell.emb_proj, shell.head_proj  # OSP's projections (MemberLinear) or None
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in every member
        self._rebind(list(members))

    def _replace(self, shell: nn.Module, members: list[nn.Module]) -> None:
        """Swap every parameterised leaf of `shell` for its member form built from the members' leaves."""
        for name, child in list(shell.named_children()):
            peers = [getattr(m, name) for m in members]
            form = _member_form(peers)
            if form is not None:
                setattr(shell, name, form)
            elif any(True for _ in child.parameters(recurse=False)):
                raise ConfigError(f"an ensemble cannot stack {type(child).__name__} ({name}): it has no member "
                                  "form (nn/ensemble.py MEMBER_FORMS); train the seeds one by one")
            else:
                self._replace(child, peers)

    def _rebind(self, members: list[GPT]) -> None:
        """Point every member parameter at its slice of the stacked tensor (a view: shared storage)."""
        stacked = dict(self.named_parameters(remove_duplicate=False))
        for s, member in enumerate(members):
            for name, p in member.named_parameters(remove_duplicate=True):
                p.data = stacked[name].data[s]

    def member_grads(self, members: Sequence[GPT]) -> None:
        """Give every member parameter its slice of the stacked gradient (a view), for its own optimizer."""
        stacked = dict(self.named_parameters(remove_duplicate=False))
        for s, member in enumerate(members):
            for name, p in member.named_parameters(remove_duplicate=True):
                g = stacked[name].grad
                p.grad = None if g is None else g[s]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (S, B, T) int64, one batch per member -> (logits (S, B, T, vocab), each member's mean
        cross-entropy (S,) over its targets (S, B, T), entries -1 ignored; or None)."""
        S, B, T = idx.shape
        if S != self.S:
            raise ValueError(f"the ensemble has {self.S} members, got batches for {S}")
        if T > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {T}; block_size is {self.config.block_size}")
        tok = self.transformer.wte(idx.reshape(S * B, T))
        if self.emb_proj is not None:
            tok = self.emb_proj(tok)
        x = self.transformer.drop(self.tap_embeddings(tok + self.transformer.wpe.positions(T, B)))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if self.head_proj is not None:
            x = self.head_proj(x)
        logits = self.lm_head(x).view(S, B, T, -1)
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                             reduction="none").view(S, -1)
        counted = (targets.reshape(S, -1) != -1).sum(1).clamp(min=1)
        return logits, ce.sum(1) / counted
