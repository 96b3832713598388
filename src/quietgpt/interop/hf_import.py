"""Hugging Face interop: GPT-2 models between transformers and quietgpt.

Import (`load_hf_gpt2(folder or hub name)`, `from_hf(model or state dict)`, both exported at the top as
quietgpt.load_hf_gpt2 and quietgpt.from_hf): a transformers GPT-2 becomes a quietgpt `GPT` with softmax
attention only when quietgpt computes exactly the same function, i.e. the same logits as transformers'
`GPT2LMHeadModel` up to float32 rounding (tests check 1e-5). Anything it cannot reproduce is a one-line
`QuietError` naming the config field and its value, never a model that silently differs:

    model_type / architectures   another model family (Llama, ...), or a GPT-2 with another head
    activation_function          anything but GELU: exact ("gelu", "gelu_python" -> model.gelu "none")
                                 or the tanh form ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh",
                                 "gelu_fast", "gelu_accurate" -> model.gelu "tanh")
    scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, add_cross_attention=True,
    layer_norm_epsilon != 1e-5, n_inner != 4 * n_embd, quantization_config
    weights                      missing ones (transformers would fill them with random values),
                                 unexpected ones, or an untied lm_head that differs from wte

Accepted as they are: `reorder_and_upcast_attn` (it only reorders the scaling and upcasts the scores to
float32, which in float32 is the same computation), `tie_word_embeddings=False` when lm_head equals wte,
dropout rates (evaluation runs without dropout), `n_positions` (the block size) and `vocab_size`.

Export (quietgpt -> Hugging Face, every variant) is quietgpt.interop.hf_export; training from a pretrained GPT-2 with
the attention swapped (train.init) is quietgpt.interop.pretrained. Import flow: model <- hf <- pretrained, metrics, cli.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from quietgpt.errors import ConfigError, QuietError
from quietgpt.nn.model import GPT, GPTConfig

GELU_EXACT = ("gelu", "gelu_python")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "gelu_accurate")
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")  # GPT2Model: the LM head is the tied wte, as in GPT-2
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which quietgpt's model uses
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS = (".attn.masked_bias", ".attn.bias")  # causal-mask buffers older transformers kept in state dicts


def _refuse(where: str, field: str, value, why: str, fix: str) -> QuietError:
    return QuietError(f"cannot import {where}: {field}={value!r} {why}; {fix}")


def check_kind(model_type, architectures, where: str = "the model") -> None:
    """QuietError unless model_type is "gpt2" and architectures (if given) are GPT-2 language models."""
    if model_type != "gpt2":
        raise _refuse(where, "model_type", model_type, "is not GPT-2 (quietgpt has GPT-2's architecture only)",
                      "pass a folder saved from transformers' GPT2LMHeadModel")
    if architectures is not None and (not isinstance(architectures, list)
                                      or any(a not in ARCHITECTURES for a in architectures)):
        raise _refuse(where, "architectures", architectures, "is not a GPT-2 language model",
                      "pass a folder saved from GPT2LMHeadModel (or GPT2Model)")


def gelu_of(activation_function, where: str = "the model") -> str:
    """model.gelu ("none" or "tanh") computing the same function as HF's `activation_function`."""
    if activation_function in GELU_EXACT:
        return "none"
    if activation_function in GELU_TANH:
        return "tanh"
    raise _refuse(where, "activation_function", activation_function, "is not a GELU quietgpt has",
                  f"pass a GPT-2 whose activation_function is one of {', '.join(GELU_EXACT + GELU_TANH)}")


def check_config(hf_config, where: str = "the model") -> GPTConfig:
    """The GPTConfig (softmax attention) whose model computes what `hf_config`'s GPT-2 computes, or a
    QuietError naming the first field quietgpt cannot reproduce."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    check_kind(get("model_type"), get("architectures"), where)
    gelu = gelu_of(get("activation_function", "gelu_new"), where)
    n_embd = get("n_embd", 768)
    fixed = (  # field, the only value quietgpt reproduces, what another value does
        ("scale_attn_weights", True, "leaves the attention scores unscaled by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", False, "scales layer i's attention scores by 1/(i+1)"),
        ("add_cross_attention", False, "adds cross-attention layers"),
    )
    for name, want, what in fixed:
        value = get(name, want)
        if value != want:
            raise _refuse(where, name, value, f"{what}, which quietgpt's model does not",
                          f"pass a GPT-2 with {name}={want}")
    eps = get("layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        raise _refuse(where, "layer_norm_epsilon", eps, f"differs from quietgpt's LayerNorm epsilon {LAYER_NORM_EPS}",
                      f"pass a GPT-2 with layer_norm_epsilon={LAYER_NORM_EPS}")
    n_inner = get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise _refuse(where, "n_inner", n_inner, f"is not 4 * n_embd ({4 * n_embd}), quietgpt's MLP width",
                      "pass a GPT-2 with n_inner unset (null) or 4 * n_embd")
    quant = get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise _refuse(where, "quantization_config", f"{method}", "holds quantized weights",
                      "pass the float model's folder")
    try:
        return GPTConfig(block_size=get("n_positions", 1024), vocab_size=get("vocab_size", 50257),
                         n_layer=get("n_layer", 12), n_head=get("n_head", 12), n_embd=n_embd, bias=True,
                         attention="softmax", gelu=gelu)
    except ConfigError as e:
        raise QuietError(f"cannot import {where}: {e}") from None


def from_hf(model_or_state_dict, config: GPTConfig | None = None, *, where: str = "the model") -> GPT:
    """A quietgpt GPT computing what a transformers GPT-2 computes: `model_or_state_dict` is a
    `GPT2LMHeadModel` (its config is checked with `check_config`) or its state dict (then pass `config`).
    HF's Conv1D stores weights as (in, out); nn.Linear wants (out, in), so those are transposed. Raises
    QuietError when anything would differ (see the module docstring)."""
    sd_hf = model_or_state_dict
    if not isinstance(model_or_state_dict, dict):
        checked = check_config(model_or_state_dict.config, where)
        config = config or checked
        sd_hf = model_or_state_dict.state_dict()
    if config is None:
        raise ConfigError("from_hf with a state dict needs config=GPTConfig(...) (n_head cannot be inferred)")
    model = GPT(config)
    sd = model.state_dict()
    keys_hf = [k for k in sd_hf if not k.endswith(BUFFERS)]
    missing = [k for k in sd if k not in sd_hf and k != "lm_head.weight"]
    if missing:
        raise ConfigError(f"not a GPT-2 state dict of this shape: missing {missing[0]} (and {len(missing) - 1} more)")
    unexpected = [k for k in keys_hf if k not in sd]
    if unexpected:
        raise ConfigError(f"not a GPT-2 state dict of this shape: unexpected {unexpected[0]} "
                          f"(and {len(unexpected) - 1} more)")
    head, wte = sd_hf.get("lm_head.weight"), sd_hf["transformer.wte.weight"]
    if head is not None and not torch.equal(head, wte):
        raise QuietError(f"cannot import {where}: tie_word_embeddings=False and its lm_head.weight differs from "
                         "transformer.wte.weight (quietgpt ties them); pass a GPT-2 with tied embeddings")
    with torch.no_grad():
        for k in keys_hf:
            if k == "lm_head.weight":
                continue  # tied: it is wte
            src = sd_hf[k].t() if k.endswith(TRANSPOSED) else sd_hf[k]
            if src.shape != sd[k].shape:
                raise ConfigError(f"shape mismatch for {k}: checkpoint {tuple(src.shape)} "
                                  f"vs model {tuple(sd[k].shape)}")
            sd[k].copy_(src)
    return model


def _first(keys, n: int = 1) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


@contextlib.contextmanager
def quiet_hf():
    """transformers' and huggingface_hub's warnings and progress bars off (a CLI error must stay one line,
    and the hub's retry notices would not), the caller's settings restored."""
    from transformers.utils import logging as hf_logging

    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover - transformers depends on it
        hub_logging = None
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_verbosity = hub_logging.get_verbosity() if hub_logging else None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if hub_logging:
        hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_logging:
            hub_logging.set_verbosity(hub_verbosity)


def _looks_like_path(name: str) -> bool:
    """True for a name that can only be a local path (hub ids are NAME or ORG/NAME)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _raw_config(path: str | Path) -> tuple[dict, str]:
    """(config.json as a dict, what transformers should load): a local folder's file, or for a name that is
    no local path a Hugging Face Hub model's (downloaded into the hub cache); QuietError when there is none."""
    name = str(path)
    folder = Path(name).expanduser()
    if not folder.exists() and not _looks_like_path(name):
        try:
            from transformers import PretrainedConfig
        except ImportError:
            raise QuietError("loading a Hugging Face model needs the transformers package; "
                             "pip install 'quietgpt[hf]'") from None
        try:
            with quiet_hf():
                raw, _ = PretrainedConfig.get_config_dict(name)
        except (OSError, ValueError) as e:
            msg = " ".join(str(e).split())[:160]
            raise QuietError(f"{name} is neither a local folder nor a model the Hugging Face Hub gave ({msg}); "
                             "pass a folder saved with save_pretrained, or a hub name where the network "
                             "reaches the hub") from None
        return raw, name
    if not (folder / "config.json").is_file():
        raise QuietError(f"{path} is not a saved Hugging Face model folder (config.json missing); "
                         "pass a folder written by save_pretrained")
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QuietError(f"{path}/config.json is not readable JSON ({' '.join(str(e).split())[:120]}); "
                         "pass a folder written by save_pretrained") from None
    return raw, str(folder)


def load_hf_gpt2(path: str | Path) -> GPT:
    """A Hugging Face GPT-2 as a quietgpt GPT (softmax attention), in eval mode, computing the same logits
    as transformers; QuietError (one line) for anything else. `path` is a folder saved by save_pretrained,
    or a Hugging Face Hub name (anything else transformers' from_pretrained takes; it needs the network
    the first time, then the hub cache)."""
    raw, source = _raw_config(path)
    if not isinstance(raw, dict):
        raise QuietError(f"{path}/config.json is not a JSON object; pass a folder written by save_pretrained")
    where = str(path)
    check_kind(raw.get("model_type"), raw.get("architectures"), where)  # before transformers guesses
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise QuietError("--hf needs the transformers package; pip install 'quietgpt[hf]'") from None
    try:
        with quiet_hf():
            check_config(GPT2Config.from_pretrained(source), where)  # before any weights are read
            hf, info = GPT2LMHeadModel.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise QuietError(f"cannot load a GPT-2 model from {path} ({msg}); pass a saved GPT-2 folder") from None
    if info.get("missing_keys"):
        raise QuietError(f"cannot import {where}: its weights lack {_first(info['missing_keys'])}, which "
                         "transformers would fill with random values; pass a complete save_pretrained folder")
    if info.get("unexpected_keys"):
        raise QuietError(f"cannot import {where}: its weights hold {_first(info['unexpected_keys'])}, which a "
                         "GPT-2 language model does not use; pass a folder saved from GPT2LMHeadModel")
    if info.get("mismatched_keys"):
        wrong = [m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"]]
        raise QuietError(f"cannot import {where}: weights of the wrong shape ({_first(wrong)}); "
                         "pass a folder whose weights match its config.json")
    return from_hf(hf, where=where).eval()
