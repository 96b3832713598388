"""Start training from a pretrained GPT-2 with the attention swapped: train.init = "hf:NAME_OR_PATH".

`quietgpt train --init hf:gpt2 --attention softmax1` reads a Hugging Face GPT-2 through interop/hf_import.py's strict
import (a save_pretrained folder, or a hub name), copies every one of its tensors into this run's model, and
sets what the variant adds by its SwapInit (SWAP_INITS) so that the swapped model starts as close to the
pretrained softmax model as the variant's math allows. What comes from where:

    architecture  n_layer, n_head, n_embd, block_size (= n_positions), vocab_size, bias (True: GPT-2 has
                  biases) and gelu are the pretrained model's. The run config's values are replaced, not
                  checked: a printed line lists every change and config.json records the resolved values.
    the user's    dropout, the attention variant and its options, the data, every training setting
    tokenizer     the pretrained model's (GPT-2 BPE: data.tokenizer "auto" means gpt2 under train.init, see
                  config.RunConfig); another whose vocabulary fits the model's (char, byte, the synthetic
                  task's) is allowed, with a note; a larger one is a one-line error naming both sizes
    seed          every seed starts from the same pretrained weights (a study's paired design); the seed
                  drives the data order, dropout, and the random init of a parameter no rule sets
    resume        continues from the checkpoint: the pretrained model is not read again (the architecture
                  comes from the checkpoint's config)

How close: before its first step the run scores the pretrained softmax model on the eval batches of its own
iteration-0 eval, prints both, and keeps the pretrained one in config.json ("init": "pretrained_loss").
softmax is the pretrained model itself; sink and gated sit ~1e-5 from it by construction (SINK_LOGIT,
GATE_LOGIT); softmax1, softmax_n and clipped have nothing to set and start where their math puts them.

Flow: model <- hf <- pretrained <- training.setup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from quietgpt.config import RunConfig, apply_overrides
from quietgpt.errors import QuietError
from quietgpt.nn.model import GPT

PREFIX = "hf:"
# what a run takes from the pretrained model (the run config's values are replaced)
FROM_PRETRAINED = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "gelu")
# The sink's null weight is exp(b) / (exp(b) + sum_j exp(s_j)) <= exp(b) = 4.5e-5 wherever a row's largest
# score is >= 0. b -> -inf would be softmax exactly, but the sink logit's gradient is proportional to that
# null weight: at b = -30 it falls below AdamW's eps (1e-8) and the sink could never learn to open. -10 is
# as close as keeps it learning at full Adam speed (measured: README, "Start from a pretrained GPT-2").
SINK_LOGIT = -10.0
# A gate multiplies its head's output by sigmoid(w . x_head + b): zero weights and b = 10 give every head
# 0.99995 of its output (the same 4.5e-5 as the sink), with a gradient still far above AdamW's eps.
GATE_LOGIT = 10.0


@dataclass(frozen=True)
class SwapInit:
    """How a variant starts from a pretrained softmax GPT-2.

    how     one line for the log: what is set and what it leaves different from the pretrained model
    config  model settings the rule fixes (recorded in config.json like the architecture)
    init    init(model): sets the variant's own parameters in place, after the pretrained tensors are copied
    """

    how: str
    config: Mapping[str, float] = field(default_factory=dict)
    init: Callable[[GPT], None] | None = None


def _open_gates(model: GPT) -> None:
    """Every head's gate constant at sigmoid(GATE_LOGIT): zero weights (the gate reads nothing yet), bias
    GATE_LOGIT. Random init keeps model.gate_init (0.25) and small random weights instead."""
    for block in model.transformer.h:
        if block.attn.gate is not None:
            torch.nn.init.zeros_(block.attn.gate.weight)
            torch.nn.init.constant_(block.attn.gate.bias, GATE_LOGIT)


# variant -> its rule. A new variant adds its own entry; one without an entry starts from its own random init
# of the parameters it adds (a printed note says so).
SWAP_INITS: dict[str, SwapInit] = {
    "softmax": SwapInit("the pretrained model itself"),
    "softmax1": SwapInit("nothing to set: exp(s_i) / (1 + sum_j exp(s_j)) scales each head's output by "
                         "sum / (1 + sum), most where its scores are small"),
    "softmax_n": SwapInit("nothing to set: the n in exp(s_i) / (n + sum_j exp(s_j)) scales each head's output by "
                          "sum / (n + sum)"),
    "sink": SwapInit(f"sink logits b_h = {SINK_LOGIT:g}: a null weight of at most exp(b_h) = "
                     f"{math.exp(SINK_LOGIT):.1e} where a row's largest score is >= 0",
                     config={"sink_init": SINK_LOGIT}),
    "clipped": SwapInit("gamma and zeta as configured: clip((zeta - gamma) p + gamma, 0, 1) zeroes every "
                        "probability below -gamma / (zeta - gamma) and stretches the rest"),
    "gated": SwapInit(f"gate weights 0 and biases {GATE_LOGIT:g}: every gate sigmoid({GATE_LOGIT:g}) = "
                      f"{1 / (1 + math.exp(-GATE_LOGIT)):.5f}", config={"gate_init": 1 / (1 + math.exp(-GATE_LOGIT))},
                      init=_open_gates),
}


def source_of(init: str) -> str:
    """The NAME_OR_PATH of train.init = "hf:NAME_OR_PATH" (config.TrainConfig checks the form)."""
    return init[len(PREFIX):].strip()


def load_pretrained(init: str) -> GPT:
    """The pretrained GPT-2 of train.init as a quietgpt softmax GPT (eval mode, CPU, float32), or a one-line
    QuietError from quietgpt.interop.hf_import's strict import."""
    from quietgpt.interop.hf_import import load_hf_gpt2

    return load_hf_gpt2(source_of(init))


def resolve_config(cfg: RunConfig, arch: Mapping) -> tuple[RunConfig, list[str]]:
    """cfg with the pretrained architecture (`arch`: a GPTConfig's fields, from the pretrained model or a
    checkpoint that started from it) and the variant's SwapInit settings; and every change as
    "model.key old -> new"."""
    want = {k: arch[k] for k in FROM_PRETRAINED}
    rule = SWAP_INITS.get(cfg.model.attention)
    if rule is not None:
        want.update(rule.config)
    changes = [f"model.{k} {getattr(cfg.model, k)!r} -> {v!r}" for k, v in want.items() if getattr(cfg.model, k) != v]
    return apply_overrides(cfg, {f"model.{k}": v for k, v in want.items()}), changes


def check_vocab(data_vocab: int, tokenizer: str, model_vocab: int, init: str) -> None:
    """QuietError unless the data's token ids all index the pretrained model's embeddings."""
    if data_vocab > model_vocab:
        raise QuietError(f"the data's {tokenizer} tokenizer has {data_vocab} tokens but the pretrained model "
                         f"{source_of(init)} has a vocabulary of {model_vocab}; use a tokenizer with at most "
                         f"{model_vocab} tokens (--set data.tokenizer=char or byte; gpt2 needs 50257)")


def tokenizer_note(tokenizer: str, data_vocab: int) -> str | None:
    """A line for a run whose tokenizer is not the pretrained model's (GPT-2 BPE), else None."""
    if tokenizer == "gpt2":
        return None
    return (f"the data's {tokenizer} tokenizer ({data_vocab} tokens) is not the pretrained model's GPT-2 BPE: its ids "
            "pick pretrained embeddings without their meaning")


def start_from(model: GPT, pretrained: GPT) -> str:
    """Copy every tensor of `pretrained` (a softmax GPT of model's architecture) into `model`, then set what
    model's variant adds by its SwapInit. Returns the line saying how the variant started."""
    variant = model.config.attention
    ours, theirs = model.state_dict(), pretrained.state_dict()
    with torch.no_grad():
        for k, v in theirs.items():
            if k not in ours or ours[k].shape != v.shape:
                raise QuietError(f"the {variant} model has no tensor {k} of shape {tuple(v.shape)}, which the "
                                 "pretrained GPT-2 holds; this variant cannot start from a pretrained model")
            ours[k].copy_(v)  # state_dict() tensors share storage with the parameters (and the wte/lm_head tie)
    rule = SWAP_INITS.get(variant)
    if rule is None:
        own = sorted({k.rsplit(".", 1)[-1] for k in ours if k not in theirs}) or ["none"]
        return (f"no pretrained-init rule for {variant} (pretrained.SWAP_INITS): its own parameters "
                f"({', '.join(own)}) keep their random init")
    if rule.init is not None:
        with torch.no_grad():
            rule.init(model)
    return rule.how


def describe(pretrained: GPT, init: str, changes: list[str]) -> str:
    """One line: the pretrained model's architecture and what it changed in the run config."""
    c = pretrained.config
    what = (f"{source_of(init)} is a GPT-2 of {c.n_layer} layers, {c.n_head} heads, {c.n_embd} dims, context "
            f"{c.block_size}, vocabulary {c.vocab_size}")
    return what + (f"; the run takes its architecture: {', '.join(changes)}" if changes
                   else "; the run config already has its architecture")
