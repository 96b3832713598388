"""The quantized model: `quantized(model, cfg, calibration)` builds a fake-quantized deep copy of `model` as a
sequence of parts (the protocol: quant/__init__.py; the grammar: quant/spec.py) and yields it; the caller's
model is never touched.

    1. transforms that keep the FP logits: SmoothQuant or the residual rotation (quant/transforms.py)
    2. weights: round-to-nearest or GPTQ (quant/gptq.py) in the blocks; embeddings and head by
       round-to-nearest at their own bits (the tied wte / lm_head is one matrix: it is quantized once, by
       round-to-nearest, never by GPTQ, whose error feedback would fit it to the head's inputs and silently
       change the embedding lookup too)
    3. activations: static per-tensor ranges calibrated on the calibration batches; q/k/v (qkv) or a KV cache
       (kv<bits>, dynamic per head and token)

Every quantization point belongs to one named group (`GROUPS_DOC`); with `only`, just the points of those
groups are quantized and everything else stays in float (the transforms still apply: they change nothing in
float). That is what the sensitivity analysis (measurement/sensitivity.py) varies.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from quietgpt.errors import QuietError
from quietgpt.nn.gates import HeadGate
from quietgpt.nn.model import GPT
from quietgpt.quant.gptq import Hessian, gptq_quantize
from quietgpt.quant.grids import ActQuantizer, quantize_per_vector, quantize_weight
from quietgpt.quant.spec import GPTQ_DAMP, QuantConfig
from quietgpt.quant.transforms import check_transforms, fold_embedding_projections, rotate_residual, smooth

Tensor = torch.Tensor

GROUPS_DOC = ("wte/head (the tied token embedding and lm_head), wpe (the position embedding), h<i>.qkv, "
              "h<i>.attn_out, h<i>.mlp_in, h<i>.mlp_out, h<i>.gate (each block's weights), act.emb (the embedding "
              "sum), act.h<i>.attn (attention probabilities, q/k/v or the KV cache), act.h<i>.linear (the inputs "
              "and outputs of the block's linear layers), act.h<i>.resid (the residual sums), act.head (the head's "
              "input and logits)")
BLOCK_GROUPS = {"attn.c_attn": "qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}


@dataclass
class QuantState:
    """What `quantized` built: the quantized copy, its activation quantizers by name, the names of the weights
    it quantized, each group's quantization points, and notes (what the rotation was, ...)."""
    config: QuantConfig
    model: GPT
    act: dict[str, ActQuantizer]
    weights: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ranges(self) -> dict[str, tuple[float | None, float | None]]:
        return {k: (q.xmin, q.xmax) for k, q in self.act.items()}


def weight_groups(model: GPT) -> dict[str, str]:
    """Every quantizable weight's parameter name -> its sensitivity group (the model as built: tied head)."""
    out = {"transformer.wte.weight": "wte/head", "lm_head.weight": "wte/head", "transformer.wpe.weight": "wpe"}
    for i, block in enumerate(model.transformer.h):
        for sub, group in BLOCK_GROUPS.items():
            out[f"transformer.h.{i}.{sub}.weight"] = f"h{i}.{group}"
        if _gate(block) is not None:
            out[f"transformer.h.{i}.attn.gate.weight"] = f"h{i}.gate"
    return out


def quant_groups(model: GPT) -> list[str]:
    """The sensitivity groups of `model`, in a fixed order (weights, then activations)."""
    n = len(model.transformer.h)
    weights = ["wte/head", "wpe"] + [f"h{i}.{g}" for i in range(n) for g in
                                     (*BLOCK_GROUPS.values(), *(["gate"] if _gate(model.transformer.h[i]) else []))]
    acts = ["act.emb"] + [f"act.h{i}.{g}" for i in range(n) for g in ("attn", "linear", "resid")] + ["act.head"]
    return weights + acts


def group_order(group: str) -> tuple:
    """A sort key that puts group names in quant_groups' order (weights, then activations, "all" last)."""
    import re

    if group == "all":
        return (3,)
    m = re.fullmatch(r"(act\.)?h(\d+)\.(\w+)", group)
    act = group.startswith("act.")
    if m:
        subs = ("attn", "linear", "resid") if act else (*BLOCK_GROUPS.values(), "gate")
        return (1 + act, 1, int(m.group(2)), subs.index(m.group(3)) if m.group(3) in subs else 9)
    ends = {"wte/head": (1, 0), "wpe": (1, 0.5), "act.emb": (2, 0), "act.head": (2, 2)}
    return ends.get(group, (2, 3)) + (0, 0)


def _gate(block: nn.Module) -> nn.Module | None:
    """The block's gate if it has a weight (HeadGate, DenseHeadGate, or OutputGate but its constant mode)."""
    gate = block.attn.gate
    return gate if gate is not None and getattr(gate, "weight", None) is not None else None


@contextlib.contextmanager
def quantized(model: GPT, cfg: QuantConfig, calibration: Iterable[Tensor], *,
              only: Iterable[str] | None = None) -> Iterator[QuantState]:
    """A fake-quantized deep copy of `model` for `cfg`, calibrated on `calibration` (int64 (B, T) token
    batches from the training split), in eval mode; `only`: quantize just these groups (quant_groups). The
    caller's model is untouched. Raises QuietError when calibration is empty or `only` names no group."""
    calib = list(calibration)
    if not calib:
        raise QuietError("quantization needs at least one calibration batch; set calib_batches >= 1")
    keep = None if only is None else set(only)
    if keep is not None and not keep <= set(quant_groups(model)):
        raise QuietError(f"unknown quantization group(s) {', '.join(sorted(keep - set(quant_groups(model))))}; "
                         f"the groups are {GROUPS_DOC}")
    state = build(model, cfg, calib, keep)
    try:
        yield state
    finally:
        state.model = None  # the copy goes with the context


def build(model: GPT, cfg: QuantConfig, calib: list[Tensor], keep: set[str] | None = None) -> QuantState:
    """The parts in order on a copy of `model` (see the module docstring)."""
    qmodel = copy.deepcopy(model).eval()
    wanted: Callable[[str], bool] = (lambda g: True) if keep is None else (lambda g: g in keep)
    state = QuantState(cfg, qmodel, {}, [], {g: [] for g in quant_groups(model)})
    check_transforms(cfg.smooth is not None, cfg.rotate, model.config)
    with torch.no_grad():
        if fold_embedding_projections(qmodel):
            state.notes.append("OSP's embedding projections folded into an untied wte and lm_head")
        if cfg.smooth is not None:
            smooth(qmodel, calib, cfg.smooth)
            state.notes.append(f"SmoothQuant alpha {cfg.smooth:g} on ln_1 and ln_2")
        if cfg.rotate:
            kind = rotate_residual(qmodel, seed=0)
            state.notes.append(f"residual stream rotated by a {kind} matrix; wte and lm_head untied")
        _quantize_weights(state, calib, wanted)
        _install_activation_quantizers(state, wanted)
        for x in calib:
            qmodel(x)
    for q in state.act.values():
        q.calibrating = False
    return state


# ----------------------------------------------------------------------------- weights


def _block_linears(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name inside the block, module) of the block's matmul layers, in the order GPTQ visits them: c_attn
    (and the gate, which reads the same input), attn.c_proj, c_fc, mlp.c_proj."""
    out = [("attn.c_attn", block.attn.c_attn)]
    if _gate(block) is not None:
        out.append(("attn.gate", block.attn.gate))
    return out + [("attn.c_proj", block.attn.c_proj), ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)]


def _rtn(w: Tensor, bits: int, cfg: QuantConfig) -> Tensor:
    return quantize_weight(w, bits, granularity=cfg.granularity, group_size=cfg.group_size, method=cfg.weight_range)


def _record(state: QuantState, group: str, name: str) -> None:
    state.weights.append(name)
    state.groups[group].append(name)


def _quantize_weights(state: QuantState, calib: list[Tensor], wanted: Callable[[str], bool]) -> None:
    m, cfg = state.model, state.config
    if cfg.method == "gptq":
        _gptq_blocks(state, calib, wanted)
    else:
        for i, block in enumerate(m.transformer.h):
            for sub, mod in _block_linears(block):
                group = f"h{i}.{BLOCK_GROUPS.get(sub, 'gate')}"
                if wanted(group):
                    mod.weight.copy_(_rtn(mod.weight, cfg.w_bits, cfg))
                    _record(state, group, f"transformer.h.{i}.{sub}.weight")
    if cfg.emb_bits is not None and wanted("wpe"):
        m.transformer.wpe.weight.copy_(_rtn(m.transformer.wpe.weight, cfg.emb_bits, cfg))
        _record(state, "wpe", "transformer.wpe.weight")
    if cfg.head_bits is not None and wanted("wte/head"):
        tied = m.lm_head.weight is m.transformer.wte.weight
        for name, p in (("lm_head.weight", m.lm_head.weight), ("transformer.wte.weight", m.transformer.wte.weight)):
            if not (tied and name == "transformer.wte.weight"):  # a tied matrix once
                p.copy_(_rtn(p, cfg.head_bits, cfg))
                _record(state, "wte/head", name)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def _block_inputs(model: GPT, calib: list[Tensor]) -> list[Tensor]:
    """The first block's input (the embedding sum) for every calibration batch."""
    xs: list[Tensor] = []

    def grab(_m, args):
        xs.append(args[0].detach())
        raise _Stop

    h = model.transformer.h[0].register_forward_pre_hook(grab)
    try:
        for x in calib:
            with contextlib.suppress(_Stop):
                model(x)
    finally:
        h.remove()
    return xs


def _gptq_blocks(state: QuantState, calib: list[Tensor], wanted: Callable[[str], bool]) -> None:
    """GPTQ block by block, sublayer by sublayer ("true sequential" in the reference code): each group of
    layers that read one input gets its Hessian from the block's calibration inputs with every earlier layer
    already quantized, and the next block's inputs come from the quantized block. A HeadGate (per-head
    vectors, not one matmul) is rounded to nearest."""
    m, cfg = state.model, state.config
    xs = _block_inputs(m, calib)
    for i, block in enumerate(m.transformer.h):
        layers = _block_linears(block)
        steps = [[n for n in ("attn.c_attn", "attn.gate") if n in dict(layers)], ["attn.c_proj"], ["mlp.c_fc"],
                 ["mlp.c_proj"]]
        for step in steps:
            todo = [(sub, dict(layers)[sub]) for sub in step if wanted(f"h{i}.{BLOCK_GROUPS.get(sub, 'gate')}")]
            if not todo:
                continue
            first = todo[0][1]
            hess = Hessian(first.weight.shape[1] if not isinstance(first, HeadGate) else block.attn.c_attn.in_features)
            hook = (block.attn.c_attn if isinstance(first, HeadGate) else first).register_forward_pre_hook(
                lambda _m, args, hess=hess: hess.add(args[0]))
            try:
                for x in xs:
                    block(x)
            finally:
                hook.remove()
            for sub, mod in todo:  # the gate reads c_attn's input: one Hessian for both
                group = f"h{i}.{BLOCK_GROUPS.get(sub, 'gate')}"
                if isinstance(mod, HeadGate):
                    mod.weight.copy_(_rtn(mod.weight, cfg.w_bits, cfg))
                else:
                    mod.weight.copy_(gptq_quantize(mod.weight, hess.H, cfg.w_bits, granularity=cfg.granularity,
                                                   group_size=cfg.group_size, method=cfg.weight_range,
                                                   act_order=cfg.act_order, damp=GPTQ_DAMP))
                _record(state, group, f"transformer.h.{i}.{sub}.weight")
        xs = [block(x) for x in xs]


# ----------------------------------------------------------------------------- activations


def _install_activation_quantizers(state: QuantState, wanted: Callable[[str], bool]) -> None:
    """Hooks on the copy that quantize its activations (static ranges, calibrated by the caller's next forward
    passes; a KV cache's grid is dynamic). Names: embeddings, h.<i>.attn_probs, h.<i>.resid_attn,
    h.<i>.block_out, h.<i>.q/k/v, <module>.in / <module>.out."""
    m, cfg = state.model, state.config

    def new_q(name: str, group: str) -> ActQuantizer:
        state.act[name] = ActQuantizer(cfg.a_bits, cfg.momentum, cfg.percentile)
        state.groups[group].append(name)
        return state.act[name]

    def quant_output(module: nn.Module, name: str, group: str) -> None:
        if wanted(group):
            q = new_q(name, group)
            module.register_forward_hook(lambda _m, _i, out, q=q: q(out))

    def quant_input(module: nn.Module, name: str, group: str) -> None:
        if wanted(group):
            q = new_q(name, group)
            module.register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]), *args[1:]))

    quant_output(m.tap_embeddings, "embeddings", "act.emb")  # the first residual stream value / ln_1 input
    for i, block in enumerate(m.transformer.h):
        quant_output(block.attn.core.tap_probs, f"h.{i}.attn_probs", f"act.h{i}.attn")
        _quantize_qkv(state, block, i, wanted, new_q)
        quant_output(block.tap_resid, f"h.{i}.resid_attn", f"act.h{i}.resid")  # x + attn(ln_1(x)), the ln_2 input
        quant_output(block.tap_out, f"h.{i}.block_out", f"act.h{i}.resid")  # the next LayerNorm's input
        for sub, mod in _block_linears(block):
            quant_input(mod, f"transformer.h.{i}.{sub}.in", f"act.h{i}.linear")
            quant_output(mod, f"transformer.h.{i}.{sub}.out", f"act.h{i}.linear")  # a gate: its values
    if cfg.head_bits is not None:
        quant_input(m.lm_head, "lm_head.in", "act.head")
        quant_output(m.lm_head, "lm_head.out", "act.head")


def _quantize_qkv(state: QuantState, block: nn.Module, i: int, wanted: Callable[[str], bool], new_q) -> None:
    """q, k, v before the attention core: static per-tensor at A bits (qkv), or k and v per head and token at
    the KV cache's bits (kv<bits>); a forward pre-hook on the core replaces its inputs."""
    cfg, group = state.config, f"act.h{i}.attn"
    if not wanted(group) or not (cfg.qkv or cfg.kv_bits is not None):
        return
    if cfg.qkv:
        qs = [new_q(f"h.{i}.{t}", group) for t in ("q", "k", "v")]
        block.attn.core.register_forward_pre_hook(
            lambda _m, args, qs=qs: (*(quant(t) for quant, t in zip(qs, args[:3], strict=True)), *args[3:]))
    else:
        bits = cfg.kv_bits
        state.groups[group].append(f"h.{i}.kv_cache")
        block.attn.core.register_forward_pre_hook(
            lambda _m, args, bits=bits: (args[0], quantize_per_vector(args[1], bits),
                                         quantize_per_vector(args[2], bits), *args[3:]))


__all__ = ["GROUPS_DOC", "QuantState", "build", "group_order", "quant_groups", "quantized", "weight_groups"]
