"""Measure each link of the chain the study is about, the way Bondarenko et al. 2023 do:
outlier weights (kurtosis, max |w|) -> outlier activations (infinity norms, kurtosis, outlier dimensions)
-> heads that park their attention (unassigned mass, first-token mass, entropy) -> perplexity, in float,
after W8A8 (or any other) fake quantization, and with PyTorch's real dynamic int8 kernels (int8-dynamic);
plus each outlier/sink paper's own statistic (sink rate, massive activations, Bondarenko et al.'s
per-sequence norms and kurtosis, first vs other tokens, gate means, exact attention zeros:
collectors._PaperStats) on the same observed windows.

`measure(model, dataset)` costs about one float pass over the validation split, one quantized pass per
quant config and a few calibration batches. One float pass computes both the perplexity and all
activation/attention statistics: the `n_sequences` sampled windows are ordinary perplexity windows
that run with the observation hooks on (and so on the reference attention path); every other window
runs on the fast path with no hooks.

The pieces: moments.py (kurtosis), collectors.py (weight rows, the activation/attention hook),
perplexity.py (windows and NLL passes), quant.py (fake quantization), registry.py (what the reported
numbers are). This module puts them together into one Measurement.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quietgpt.errors import QuietError
from quietgpt.interop.hf_import import load_hf_gpt2
from quietgpt.measurement.collectors import StatsCollector, weight_stats
from quietgpt.measurement.perplexity import (
    Fidelity,
    batch_sizes,
    calibration_batches,
    fidelity_pass,
    nll_pass,
    observed_windows,
    ppl_of,
)
from quietgpt.measurement.registry import ACTIVATIONS, eval_summary
from quietgpt.measurement.sensitivity import group_penalties
from quietgpt.nn.model import GPT
from quietgpt.quant.dynamic import check_dynamic, int8_dynamic
from quietgpt.quant.simulated import quantized
from quietgpt.quant.spec import QuantConfig, parse_quant_list

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- the measurement


@dataclass
class Measurement:
    """Everything `quietgpt eval` reports; `to_dict()` is its JSON (keys documented in the README)."""
    weights: list[dict]
    weights_by_layer: list[dict]
    activations: list[dict]
    attention: list[dict]
    perplexity: dict[str, float | int]  # fp, tokens, and one entry per quant config
    loss: dict[str, float]  # mean token NLL in nats: fp and one entry per quant config
    summary: dict[str, Any]
    quant: dict[str, dict]  # each quant config's settings
    model: dict
    checkpoint: str | None
    data: str | None
    n_sequences: int
    block_size: int
    seed: int
    calib_batches: int
    timings: dict[str, float]
    wall_s: float
    eval_tokens: int | None = None  # perplexity on the first eval_tokens validation tokens (None: all)
    extra: dict[str, Any] = field(default_factory=dict)
    observed: list[int] = field(default_factory=list)  # start offsets of the windows the statistics read
    # per quant config, against the float model on the same tokens: mean KL(P_fp || P_q) in nats/token, and the
    # share of tokens whose top-1 prediction is the float model's (llama.cpp's KL-divergence report)
    kl: dict[str, float] = field(default_factory=dict)
    top1_agreement: dict[str, float] = field(default_factory=dict)
    # per config asked for: each quantization group's perplexity ratio with only it quantized, and "all"
    # (measurement/sensitivity.py)
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    # each paper's own statistic, per layer or module (collectors._PaperStats; README "Measurement")
    sinks: list[dict] = field(default_factory=list)  # Gu et al.'s sink rate, Kaul et al.'s argmax share
    massive: list[dict] = field(default_factory=list)  # Sun et al.'s massive activations (block output)
    bondarenko: list[dict] = field(default_factory=list)  # Bondarenko et al.'s per-module norms and kurtosis
    first_token: list[dict] = field(default_factory=list)  # Kaul et al.'s first vs other tokens (block output)
    gates: list[dict] = field(default_factory=list)  # Qiu et al.'s mean gate value (gated variants only)
    sparsity: list[dict] = field(default_factory=list)  # Zuhri et al.'s exact zeros of the attention weights

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _jsonable(obj):
    """Plain JSON types, with NaN/inf as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic | torch.Tensor):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _summary(ev: dict, quant: Sequence[str], eval_tokens: int | None) -> dict:
    """Every eval metric of the registry (registry.py: one definition each) from the eval JSON's sections
    `ev`, plus where the largest activation kurtosis and |activation| sit (site, layer, dim, position,
    token), which are locations, not metrics."""
    out: dict[str, Any] = eval_summary(ev, quant, eval_tokens)
    acts = [a for a in ACTIVATIONS.entries(ev) if a["kurtosis"] is not None]
    if acts:
        worst = max(acts, key=lambda a: a["kurtosis"])
        out["act_kurtosis_max_at"] = dict(site=worst["site"], layer=worst["layer"])
        big = max(acts, key=lambda a: a["inf_norm_max"])
        out["act_inf_norm_max_at"] = dict(site=big["site"], layer=big["layer"], **big["max"])
    return out


def measure(model: GPT, dataset, *, quant: Sequence[str] | str = ("w8a8",), n_sequences: int = 64,
            calib_batches: int = 16, seed: int = 0, device: str | torch.device = "cpu",
            batch_size: int = 16, calib_batch_size: int = 8, block_size: int | None = None, top_k: int = 5,
            checkpoint: str | None = None, data: str | None = None, eval_tokens: int | None = None,
            sensitivity: Sequence[str] | str = ()) -> Measurement:
    """Measure `model` on `dataset` (anything with 1-D integer arrays .train and .val and .vocab_size).

    Float perplexity over the whole validation split (or its first `eval_tokens` tokens) in
    non-overlapping windows of block_size (default: the model's); activation and attention statistics
    over `n_sequences` full windows drawn from those with `seed`; weight statistics; and for each quant
    config (see quant.parse_quant), perplexity of the fake-quantized model calibrated on `calib_batches`
    seeded batches of the training split; "int8-dynamic" runs PyTorch's int8 kernels on a quantized copy (CPU
    only: a QuietError before any work on another device). `timings` holds each config's pass in seconds
    ("<name>_s"; for int8-dynamic also "<name>_convert_s", the quantize_dynamic call). `sensitivity`: simulated
    configs whose penalty is also measured one quantization group at a time (measurement/sensitivity.py; its
    wall time is "sensitivity_s"). The model is left as it
    was (weights restored, hooks removed, train/eval mode kept, on its own device: on another `device` a copy is
    measured).
    """
    t_start = time.perf_counter()
    configs = parse_quant_list(quant)
    sens = parse_quant_list(sensitivity)
    dynamic = [c.name for c in sens if c.kind != "simulated"]
    if dynamic:
        raise QuietError(f"sensitivity needs a simulated quant config, not {dynamic[0]}; name a w<bits>a<bits> one")
    for cfg in configs:
        if cfg.kind == "dynamic":
            check_dynamic(cfg, device)
    T = min(block_size or model.config.block_size, model.config.block_size)
    if eval_tokens is not None and (isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int)
                                    or eval_tokens < 2):
        raise QuietError(f"eval_tokens must be an integer >= 2 (or None for the whole split), got {eval_tokens!r}")
    val = dataset.val if eval_tokens is None else dataset.val[:eval_tokens]
    vocab = int(getattr(dataset, "vocab_size", 0) or 0)
    if vocab > model.config.vocab_size:
        raise QuietError(f"the data's vocabulary ({vocab} tokens) is larger than the model's "
                         f"({model.config.vocab_size}); evaluate on data prepared with the model's tokenizer")
    if len(val) < 2:
        raise QuietError("the validation split has fewer than 2 tokens; prepare more data or raise data.val_fraction")
    top = int(np.max(val)) if len(val) else 0
    if top >= model.config.vocab_size:
        raise QuietError(f"the validation data has token id {top} but the model's vocabulary is "
                         f"{model.config.vocab_size}; evaluate on data prepared with the model's tokenizer")
    if n_sequences < 1:
        raise QuietError(f"n_sequences must be >= 1, got {n_sequences}")
    device = torch.device(device)
    if not _on(model, device):
        model = copy.deepcopy(model).to(device)  # the caller's model stays where it is
    was_training = model.training
    model.eval()
    try:
        windows, observed = observed_windows(len(val), T, n_sequences, seed)
        sample = set(observed)
        sizes = batch_sizes(T, model.config.vocab_size, model.config.n_head, batch=batch_size, calib=calib_batch_size)
        collector = StatsCollector(top_k)
        timings = {}
        t0 = time.perf_counter()
        nll, ntok = nll_pass(model, val, windows, batch_size=sizes.plain, device=device, observed=sample,
                             collector=collector, observe_batch=sizes.observed)
        timings["fp_and_stats_s"] = time.perf_counter() - t0
        perplexity: dict[str, float | int] = {"fp": ppl_of(nll, ntok), "tokens": ntok}
        loss = {"fp": nll / ntok}
        t0 = time.perf_counter()
        weights, by_layer = weight_stats(model)
        timings["weights_s"] = time.perf_counter() - t0
        calib = (calibration_batches(dataset.train, calib_batches, sizes.calib, T, seed, device)
                 if any(c.kind == "simulated" for c in [*configs, *sens]) else [])
        timings["calib_s"] = 0.0
        kl, top1 = {}, {}
        for cfg in configs:
            fid = _quantized_pass(model, cfg, calib, val, windows, sizes.plain, device, timings)
            perplexity[cfg.name] = ppl_of(fid.nll, ntok)
            loss[cfg.name] = fid.nll / ntok
            kl[cfg.name], top1[cfg.name] = fid.kl / fid.tokens, fid.top1_same / fid.tokens
        t0 = time.perf_counter()
        by_group = {c.name: group_penalties(model, c, calib, val, windows, perplexity["fp"], batch_size=sizes.plain,
                                            device=device) for c in sens}
        if sens:
            timings["sensitivity_s"] = time.perf_counter() - t0
        activations, attention, papers = collector.activation_rows(), collector.attention_rows(), collector.papers()
        ev = dict(weights=weights, activations=activations, attention=attention, perplexity=perplexity, kl=kl,
                  top1_agreement=top1, **papers)
        summary = _summary(ev, [c.name for c in configs], eval_tokens)
        return Measurement(
            weights=weights, weights_by_layer=by_layer, activations=activations, attention=attention,
            perplexity=perplexity, loss=loss, kl=kl, top1_agreement=top1, sensitivity=by_group, summary=summary,
            quant={c.name: c.to_dict() for c in configs}, model=model.config.to_dict(), checkpoint=checkpoint,
            data=data, n_sequences=len(sample), block_size=T, seed=seed, calib_batches=calib_batches,
            observed=[windows[i][0] for i in observed],
            timings=timings, wall_s=time.perf_counter() - t_start, eval_tokens=eval_tokens, **papers,
        )
    finally:
        model.train(was_training)


def _on(model: GPT, device: torch.device) -> bool:
    """Are all of model's parameters on `device` ("cuda" counts as the current CUDA device)?"""
    def index(d: torch.device) -> int:
        return d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)
    return all(p.device.type == device.type and index(p.device) == index(device) for p in model.parameters())


def _quantized_pass(model: GPT, cfg: QuantConfig, calib: list[Tensor], val, windows, batch_size: int, device,
                    timings: dict[str, float]) -> Fidelity:
    """`cfg`'s quantized model over `windows` of `val`, side by side with `model` (fidelity_pass); its wall times
    go into `timings` (the float model's share of the pass included)."""
    t0 = time.perf_counter()
    if cfg.kind == "dynamic":  # PyTorch's int8 kernels on a copy (check_dynamic ran: the device is the CPU)
        qmodel = int8_dynamic(model)
        t1 = time.perf_counter()
        timings[f"{cfg.name}_convert_s"] = t1 - t0
        fid = fidelity_pass(model, qmodel, val, windows, batch_size=batch_size, device=device, q_device="cpu")
        del qmodel
    else:
        with quantized(model, cfg, calib) as q:
            t1 = time.perf_counter()
            timings["calib_s"] += t1 - t0
            fid = fidelity_pass(model, q.model, val, windows, batch_size=batch_size, device=device)
    timings[f"{cfg.name}_s"] = time.perf_counter() - t1
    return fid


def evaluate_checkpoint(ckpt_dir: str | Path, *, data: str | None = None, quant: Sequence[str] | str = ("w8a8",),
                        device: str = "cpu", **kw) -> dict:
    """load_model(ckpt_dir) + prepare(its data config, with the source replaced by `data` if given)
    + measure(...).to_dict(). Raises QuietError for a missing/bad checkpoint or mismatched data."""
    import dataclasses

    from quietgpt.runs.checkpoint import load_model

    parse_quant_list(quant)  # fail on a bad config before loading anything
    model, cfg = load_model(ckpt_dir, device=device)
    from quietgpt.data.sources import prepare

    data_cfg = cfg.data if data is None else dataclasses.replace(cfg.data, source=data)
    try:
        dataset = prepare(data_cfg)
    except QuietError as e:
        raise QuietError(_eval_advice(str(e), hf=False)) from None
    _check_tokenizer(ckpt_dir, dataset)
    return measure(model, dataset, quant=quant, device=device, checkpoint=str(ckpt_dir),
                   data=data_cfg.source, **kw).to_dict()


def _eval_advice(msg: str, *, hf: bool) -> str:
    """tokenizers.py's advice for train/prepare names `--set data.tokenizer=X`; `eval` has no --set: with --hf it
    takes --tokenizer X, and a checkpoint must be read with its own tokenizer."""
    if hf:
        return re.sub(r"--set data\.tokenizer=(\w+)", r"--tokenizer \1", msg)
    msg = re.sub(r",? or use --set data\.tokenizer=\w+", "", msg)
    return re.sub(r"use --set data\.tokenizer=\w+", "pass --data that the checkpoint's own tokenizer reads", msg)


def _check_tokenizer(ckpt_dir, dataset) -> None:
    """If the checkpoint recorded its tokenizer (config.json "tokenizer"), the data must use the same one:
    two char vocabularies of equal size can still map ids to different characters."""
    import json

    try:
        meta = json.loads((Path(ckpt_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    want = meta.get("tokenizer") if isinstance(meta, dict) else None
    tok = getattr(dataset, "tokenizer", None)
    have = tok.to_meta() if tok is not None and hasattr(tok, "to_meta") else None
    if isinstance(want, dict) and isinstance(have, dict) and want != have:
        raise QuietError(f"the data's tokenizer ({have.get('name', have)}) differs from the one the checkpoint "
                         f"was trained with ({want.get('name', want)}); pass --data prepared with the same tokenizer")


def evaluate_hf(path: str | Path, *, data: str, tokenizer: str | None = None, quant: Sequence[str] | str = ("w8a8",),
                device: str = "cpu", cache_dir: str = "", **kw) -> dict:
    """measure(...).to_dict() of a saved Hugging Face GPT-2 model on the data source `data`, tokenised
    with `tokenizer` (default: gpt2 when the model has GPT-2's vocabulary, else the data's default) and
    cached in `cache_dir` ("" = the default cache)."""
    from quietgpt.config import DataConfig

    parse_quant_list(quant)
    model = load_hf_gpt2(path)
    from quietgpt.data.sources import prepare

    if tokenizer is None:
        tokenizer = "gpt2" if model.config.vocab_size >= 50257 else "auto"
    try:
        dataset = prepare(DataConfig(source=data, tokenizer=tokenizer, cache_dir=cache_dir))
    except QuietError as e:
        raise QuietError(_eval_advice(str(e), hf=True)) from None
    if dataset.vocab_size > model.config.vocab_size:
        raise QuietError(f"--tokenizer {tokenizer} gives a vocabulary of {dataset.vocab_size} tokens but the model "
                         f"in {path} has {model.config.vocab_size}; pass the --tokenizer the model was trained with "
                         "(auto, char, byte or gpt2)")
    return measure(model, dataset, quant=quant, device=device, checkpoint=str(path), data=data, **kw).to_dict()
